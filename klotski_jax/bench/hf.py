"""The `hf-accelerate` peer of `klotski bench`: HF transformers + accelerate offloading.

The model is loaded from the HF checkpoint our checkpoint was converted from (its manifest's
`source`, or `--hf-dir`) with `device_map="auto"` and `max_memory` equal to our device budget:
on a CUDA machine `{0: device budget, "cpu": host budget}` (the rest on disk), on a CPU-only
machine `{"cpu": device budget}` with every layer that does not fit offloaded to disk
(`offload_folder`, which transformers 5.24 + accelerate 1.15 write as safetensors files and
memory-map back at every forward). With no device budget everything is loaded in memory.

It generates greedily from the same prompt token ids with EOS disabled, so exactly gen_len
tokens per prompt. Per batch, prefill is timed as a 1-new-token `generate` call and the run as a
full one; decode = full - prefill. accelerate's hooks are wrapped to count what it moves:
the seconds in the pre-forward hooks of offloaded modules are I/O waits (accelerate never
overlaps them with compute), and their bytes are moved to the execution device (read from the
offload folder for modules mapped to "disk").

torch and accelerate are in the `test` extra only: `require_hf()` raises `HFUnavailable`
without them, and the bench reports the schedule as skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install torch==2.13.0, then pip install -e '.[test]' (an unpinned torch "
                "pulls a multi-GB CUDA build)")


class HFUnavailable(RuntimeError):
    """The hf-accelerate peer cannot run here: no torch / accelerate, or no HF checkpoint."""


def require_hf() -> None:
    """Raise HFUnavailable unless torch, accelerate and transformers import."""
    try:
        import accelerate  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise HFUnavailable(f"hf-accelerate needs torch and accelerate (the `test` extra; "
                            f"{INSTALL_HINT}): {e}") from None


def max_memory(device_budget: int | None, host_budget: int | None, *, device_ram: int | None,
               host_ram: int) -> dict[Any, int] | None:
    """accelerate's `max_memory` for our budgets (None: load everything in memory).

    device_ram: the accelerator's memory (None: a CPU-only machine); host_ram: the free RAM.
    With an accelerator, device 0 gets the device budget and "cpu" the host budget (what there
    is when a budget is unlimited); on a CPU-only machine the CPU is the execution device, so it
    gets the device budget and the rest goes to the offload folder on disk.
    """
    if device_ram is None:
        return None if device_budget is None else {"cpu": device_budget}
    if device_budget is None and host_budget is None:
        return None
    return {0: device_ram if device_budget is None else device_budget,
            "cpu": host_ram if host_budget is None else host_budget}


def tier_of(module_name: str, device_map: Mapping[str, Any]) -> Any:
    """The device-map entry of a module: the longest mapped name that is it or a parent."""
    best, tier = -1, None
    for key, value in device_map.items():
        if (key == "" or module_name == key or module_name.startswith(key + ".")) and \
                len(key) > best:
            best, tier = len(key), value
    return tier


@dataclasses.dataclass
class Meter:
    """What accelerate's offload hooks did since the last reset."""

    io_s: float = 0.0
    bytes_to_device: int = 0
    bytes_read_disk: int = 0
    loaded: int = 0
    peak_loaded: int = 0

    def reset(self) -> None:
        """Zero the counters before a timed call."""
        self.io_s, self.bytes_to_device, self.bytes_read_disk, self.peak_loaded = 0.0, 0, 0, 0
        self.loaded = 0


class HFPeer:
    """An HF model loaded under our budgets, generating like the engine does."""

    def __init__(self, hf_dir: str | os.PathLike[str], dtype: str, device_budget: int | None,
                 host_budget: int | None, offload_dir: str | os.PathLike[str]) -> None:
        require_hf()
        import psutil
        import torch
        import transformers

        self.hf_dir = pathlib.Path(hf_dir)
        if not (self.hf_dir / "config.json").is_file():
            raise HFUnavailable(f"no HF checkpoint at {self.hf_dir} (pass --hf-dir)")
        self.offload_dir = pathlib.Path(offload_dir)
        self.cuda = torch.cuda.is_available()
        device_ram = torch.cuda.get_device_properties(0).total_memory if self.cuda else None
        self.max_memory = max_memory(device_budget, host_budget, device_ram=device_ram,
                                     host_ram=psutil.virtual_memory().available)
        transformers.utils.logging.disable_progress_bar()
        # "Some parameters are on the meta device because they were offloaded": the point here.
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
        start = time.perf_counter()
        kw: dict[str, Any] = {"device_map": "auto"}
        if self.max_memory is not None:
            kw |= {"max_memory": self.max_memory, "offload_folder": str(self.offload_dir)}
        elif not self.cuda:
            kw = {"device_map": {"": "cpu"}}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.hf_dir, dtype=getattr(torch, dtype), local_files_only=True, **kw).eval()
        self.setup_s = time.perf_counter() - start
        self.model.generation_config.eos_token_id = None  # exactly gen_len tokens
        self.device_map = dict(getattr(self.model, "hf_device_map", {}) or {"": "cpu"})
        self.exec_device = "cuda" if self.cuda else "cpu"
        self.meter = Meter()
        self.host_offloaded = self._instrument()
        self.resident = sum(t.numel() * t.element_size()
                            for t in [*self.model.parameters(), *self.model.buffers()]
                            if t.device.type == self.exec_device)

    def describe(self) -> dict[str, Any]:
        """max_memory, how many modules landed in each tier, and the load time."""
        tiers: dict[str, int] = {}
        for v in self.device_map.values():
            tiers[str(v)] = tiers.get(str(v), 0) + 1
        return {"max_memory": {str(k): v for k, v in (self.max_memory or {}).items()} or None,
                "device_map_tiers": tiers, "load_s": self.setup_s}

    def _instrument(self) -> int:
        """Wrap the pre/post-forward hooks of offloaded modules; returns host-offloaded bytes."""
        from accelerate.hooks import AlignDevicesHook, SequentialHook
        from accelerate.utils import named_module_tensors

        host = 0
        for name, module in self.model.named_modules():
            hook = getattr(module, "_hf_hook", None)
            hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
            for h in hooks:
                if not isinstance(h, AlignDevicesHook) or not h.offload:
                    continue
                nbytes = sum(t.numel() * t.element_size() for _, t in named_module_tensors(
                    module, include_buffers=h.offload_buffers, recurse=h.place_submodules))
                disk = tier_of(name, self.device_map) == "disk"
                host += 0 if disk else nbytes
                self._wrap(h, nbytes, disk)
        return host

    def _wrap(self, hook: Any, nbytes: int, disk: bool) -> None:
        pre, post, meter, sync = hook.pre_forward, hook.post_forward, self.meter, self._sync

        def timed_pre(module: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = pre(module, *args, **kwargs)
            sync()
            meter.io_s += time.perf_counter() - start
            meter.bytes_to_device += nbytes
            meter.bytes_read_disk += nbytes if disk else 0
            meter.loaded += nbytes
            meter.peak_loaded = max(meter.peak_loaded, meter.loaded)
            return out

        def counted_post(module: Any, output: Any) -> Any:
            meter.loaded -= nbytes
            return post(module, output)

        hook.pre_forward, hook.post_forward = timed_pre, counted_post

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def evict_page_cache(self) -> None:
        """Drop the HF checkpoint's and the offload folder's files from the page cache."""
        if not hasattr(os, "posix_fadvise"):
            return
        os.sync()
        for root in (self.hf_dir, self.offload_dir):
            for path in root.rglob("*"):
                if path.is_file():
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)

    def _generate(self, ids: np.ndarray, mask: np.ndarray, n: int, pad_id: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                torch.from_numpy(ids).to(self.exec_device),
                attention_mask=torch.from_numpy(mask).to(self.exec_device), do_sample=False,
                use_cache=True, max_new_tokens=n, pad_token_id=pad_id)
        self._sync()
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return out[:, ids.shape[1]:].cpu().numpy()

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int, per_round: int, pad_id: int,
            cold_disk: bool) -> dict[str, Any]:
        """Generate gen_len tokens per prompt in batches of per_round; RunStats-like fields."""
        stats: dict[str, Any] = {
            "schedule": "hf-accelerate", "groups": 1, "batch_size": min(per_round, len(prompts)),
            "prompt_tokens": 0, "generated_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
            "io_wait_s": 0.0, "bytes_read_disk": 0, "bytes_to_device": 0,
            "peak_device_bytes": 0, "peak_host_bytes": self.host_offloaded if self.cuda else None}
        tokens: list[list[int]] = []
        for start in range(0, len(prompts), per_round):
            ids, mask = left_pad(prompts[start:start + per_round], pad_id)
            if cold_disk:
                self.evict_page_cache()
            t0 = time.perf_counter()
            self._generate(ids, mask, 1, pad_id)
            prefill = time.perf_counter() - t0
            if cold_disk:
                self.evict_page_cache()
            self.meter.reset()
            if self.cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            new = self._generate(ids, mask, gen_len, pad_id)
            total = time.perf_counter() - t0
            self._add(stats, prefill, total, int(mask.sum()), new.size)
            tokens += new.tolist()
        stats["token_ids"] = tokens
        return stats

    def _add(self, stats: dict[str, Any], prefill: float, total: float, prompt_tokens: int,
             generated: int) -> None:
        m = self.meter
        stats["prompt_tokens"] += prompt_tokens
        stats["generated_tokens"] += generated
        stats["prefill_s"] += prefill
        stats["decode_s"] += max(total - prefill, 0.0)
        stats["io_wait_s"] += m.io_s
        stats["bytes_read_disk"] += m.bytes_read_disk
        stats["bytes_to_device"] += m.bytes_to_device
        if self.cuda:
            import torch

            peak = int(torch.cuda.max_memory_allocated())
        else:  # weights only: what stays on the CPU plus what the hooks hold at once
            peak = self.resident + m.peak_loaded
        stats["peak_device_bytes"] = max(stats["peak_device_bytes"], peak)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask [b, s] of prompts left-padded to the longest (int64)."""
    s = max(len(p) for p in prompts)
    ids = np.full((len(prompts), s), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, s - len(p):] = p
        mask[r, s - len(p):] = 1
    return ids, mask
