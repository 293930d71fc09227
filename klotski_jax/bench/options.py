"""The options of `klotski bench` and the plan of its runs: schedules, presets, the
configurations and variants, the order of the runs, the synthetic prompts."""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from klotski_jax.planning.policy import Policy, PolicyError

ENGINE_SCHEDULES = ("klotski", "flexgen", "lru", "sequential")
HF_SCHEDULE = "hf-accelerate"
SCHEDULES = (*ENGINE_SCHEDULES, HF_SCHEDULE)
QUANTIZED = ("int8", "int4")  # --quantized: klotski rows on stores with quantized experts
RESIDENT = "resident"  # klotski with unlimited budgets: every weight on the device
# The text sample after the table: a tiny model loops under plain greedy decoding.
SAMPLE_REPETITION_PENALTY = 1.3

# The paper's ablation ladder (section 6): each rung turns one idea of klotski on.
ABLATION_LADDER: tuple[tuple[str, dict[str, bool]], ...] = (
    ("simple", {"multi_batch": False, "hot_only_prefetch": False, "reorder": False}),
    ("+multi-batch", {"multi_batch": True, "hot_only_prefetch": False, "reorder": False}),
    ("+hot-only", {"multi_batch": True, "hot_only_prefetch": True, "reorder": False}),
    ("+reorder", {}),  # = klotski
)
FIELDS = ("schedule", "throughput_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
          "io_wait_s", "io_wait_fraction", "bytes_read_disk", "bytes_to_device",
          "peak_device_bytes", "peak_host_bytes", "efficiency")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A workload's default shape."""

    name: str
    prompt_len: int
    gen_len: int
    num_prompts: int
    note: str


PRESETS = {
    "paper": Preset("paper", 512, 32, 32, "the paper's prompt 512 / output 32"),
    "cpu": Preset("cpu", 32, 8, 8, "the CPU preset, smaller than the paper's prompt 512 / "
                  "output 32 so that a 2-core machine finishes in minutes"),
}


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The options of `klotski bench`; SIZE budgets stay text until the weight bytes are known."""

    ckpt: str | None = None  # None: the embedded default model
    schedules: tuple[str, ...] = SCHEDULES
    preset: str = "auto"  # auto: "paper" on an accelerator, "cpu" on a CPU-only machine
    prompt_len: int | None = None
    gen_len: int | None = None
    num_prompts: int | None = None
    batch_size: int | None = None
    groups: int | None = None  # None: the Policy default (the planner's choice when it has one)
    prompts: str | None = None  # JSON Lines file like `klotski generate --input`
    seed: int = 0
    device_budget: str | None = None
    host_budget: str | None = None
    cold_disk: bool = False
    io_mode: str = "buffered"
    expert_batch: int = Policy.expert_batch  # ready experts of few rows per call (every schedule)
    profile: bool = False  # measure (or reuse) the planner's profile first: klotski is planned
    repeats: int = 2
    ablation: bool = False
    quantized: tuple[str, ...] = ()  # also run klotski on these quantized stores of the model
    sweep_groups: tuple[int, ...] = ()
    # --devices: every engine schedule once per device count (expert parallelism); (): the
    # engine's default only
    devices: tuple[int, ...] = ()
    hf_dir: str | None = None
    json: str | None = None
    markdown: str | None = None  # the table with the date, machine and command: a results file
    plot: str | None = None
    trace: str | None = None
    sample: int = 0
    quiet: bool = False
    command: str = ""  # recorded in every JSON line

    def __post_init__(self) -> None:
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise PolicyError(f"--schedules must be a non-empty list of {', '.join(SCHEDULES)}; "
                              f"got {', '.join(self.schedules) or 'nothing'}")
        if self.preset not in ("auto", *PRESETS):
            raise PolicyError(f"preset must be auto, {' or '.join(PRESETS)}, got {self.preset!r}")
        if self.repeats < 1:
            raise PolicyError(f"repeats must be >= 1, got {self.repeats}")
        bad = [q for q in self.quantized if q not in QUANTIZED]
        if bad:
            raise PolicyError(f"--quantized must be a list of {', '.join(QUANTIZED)}; got "
                              f"{', '.join(bad)}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.devices) \
                or len(set(self.devices)) != len(self.devices):
            raise PolicyError(f"--devices must be distinct positive device counts, got "
                              f"{', '.join(map(str, self.devices))}")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One workload shape under one pair of budgets (bytes; None: unlimited)."""

    prompt_len: int
    gen_len: int
    num_prompts: int
    groups: int | None
    batch_size: int | None
    device_budget: int | None
    host_budget: int | None
    cold_disk: bool
    io_mode: str
    preset: str
    expert_batch: int

    def policy(self, schedule: str, **overrides: Any) -> Policy:
        """The engine policy of `schedule` under this configuration's budgets and layout."""
        kw: dict[str, Any] = {"schedule": schedule, "device_budget": self.device_budget,
                              "host_budget": self.host_budget, "batch_size": self.batch_size,
                              "io_mode": self.io_mode, "evict_page_cache": self.cold_disk,
                              "expert_batch": self.expert_batch}
        if self.groups is not None:
            kw["groups"] = self.groups
        return Policy(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a schedule (on a device count of --devices), or an ablation rung of
    klotski, or the resident bound."""

    label: str
    schedule: str  # engine schedule, or hf-accelerate
    overrides: tuple[tuple[str, Any], ...] = ()
    ablation: str | None = None
    store: str | None = None  # a quantized store of the model (--quantized), not the checkpoint
    devices: int | None = None  # local devices of the run (None: the engine's default)

    def policy(self, cfg: BenchConfig) -> Policy:
        """The policy of this row under `cfg` (resident: no budgets)."""
        over = dict(self.overrides)
        if self.label == RESIDENT:
            over |= {"device_budget": None, "host_budget": None}
        if self.devices is not None:
            over["devices"] = self.devices
        return cfg.policy(self.schedule, **over)


def device_label(schedule: str, devices: int | None) -> str:
    """A row's label: the schedule, with its device count when --devices gave one."""
    return schedule if devices is None else f"{schedule} @{devices}dev"


# ---- plan -------------------------------------------------------------------------------------
def variants(schedules: Sequence[str], ablation: bool, quantized: Sequence[str] = (),
             devices: Sequence[int] = ()) -> list[Variant]:
    """The rows to run: the schedules (each engine schedule once per device count of `devices`,
    labelled "klotski @2dev"; hf-accelerate once, on one device), klotski on each quantized
    store, the ablation rungs (the last is klotski), the bound; these last on the first device
    count."""
    counts: Sequence[int | None] = devices or (None,)
    first = counts[0]
    out = []
    for s in schedules:
        if s == HF_SCHEDULE:
            out.append(Variant(s, s))
        else:
            out += [Variant(device_label(s, d), s, devices=d) for d in counts]
    out += [Variant(f"klotski {q}", "klotski", store=q, devices=first) for q in quantized]
    if ablation:
        for name, flags in ABLATION_LADDER[:-1]:
            out.append(Variant(f"klotski {name}", "klotski", tuple(flags.items()), name,
                               devices=first))
        if "klotski" not in schedules:
            out.append(Variant(device_label("klotski", first), "klotski", (),
                               ABLATION_LADDER[-1][0], devices=first))
    out.append(Variant(RESIDENT, "klotski", devices=first))
    return out


def run_order(n_configs: int, labels: Sequence[str], repeats: int
              ) -> list[tuple[int, str, int]]:
    """(configuration, label, repeat) in execution order; repeat -1 is the untimed warm-up.

    Per configuration: every label's warm-up, then `repeats` rounds in which the labels
    alternate, the order rotated by one each round (A B C, B C A, C A B, ...).
    """
    order = []
    for c in range(n_configs):
        order += [(c, label, -1) for label in labels]
        for r in range(repeats):
            k = r % len(labels)
            order += [(c, label, r) for label in [*labels[k:], *labels[:k]]]
    return order


def default_groups() -> int | None:
    """Policy's default n (None once a planner chooses it)."""
    return {f.name: f.default for f in dataclasses.fields(Policy)}["groups"]


def configurations(opts: BenchOptions, preset: Preset, device_budget: int | None,
                   host_budget: int | None) -> list[BenchConfig]:
    """The base configuration, or one per n of --sweep-groups (n x a fixed per-group batch)."""
    num = opts.num_prompts or preset.num_prompts
    base = BenchConfig(prompt_len=opts.prompt_len or preset.prompt_len,
                       gen_len=opts.gen_len or preset.gen_len, num_prompts=num,
                       groups=opts.groups, batch_size=opts.batch_size,
                       device_budget=device_budget, host_budget=host_budget,
                       cold_disk=opts.cold_disk, io_mode=opts.io_mode, preset=preset.name,
                       expert_batch=opts.expert_batch)
    if not opts.sweep_groups:
        return [base]
    batch = opts.batch_size or max(1, num // (opts.groups or default_groups() or 2))
    return [dataclasses.replace(base, groups=n, batch_size=batch, num_prompts=n * batch)
            for n in opts.sweep_groups]


def synthetic_prompts(n: int, length: int, vocab_size: int, special: Sequence[int], seed: int
                      ) -> list[list[int]]:
    """n seeded prompts of `length` random token ids, none of them a special token."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special), np.int64))
    return [allowed[rng.integers(0, len(allowed), length)].tolist() for _ in range(n)]


def resolve_preset(name: str) -> Preset:
    """auto: the paper's workload on an accelerator, the CPU preset on a CPU-only machine."""
    if name != "auto":
        return PRESETS[name]
    import jax

    return PRESETS["cpu" if jax.default_backend() == "cpu" else "paper"]


def when() -> str:
    """Now, in UTC, for the results."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def rounds(num_prompts: int, per_round: int) -> int:
    """How many rounds of per_round sequences the engine runs for num_prompts."""
    return math.ceil(num_prompts / per_round)


def status(msg: str, quiet: bool) -> None:
    """A line for the user on stderr (the table owns stdout)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
