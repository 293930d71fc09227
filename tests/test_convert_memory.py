"""The converter streams: peak RSS growth stays far below the checkpoint's size.

Two shapes: an expert-heavy one (experts are most bytes, as in real MoE models) and a
dense-heavy one (8 layers of 1024-wide attention, 2 tiny experts), whose dense arrays go through
the single orbax save of `dense/`: that save must not hold every dense weight at once.

A ~210 MB float32 Mixtral-shaped HF checkpoint is written straight from numpy (no torch, no model
build), sharded with an index, with layer 0 in the per-expert layout and layer 1 in the fused
transformers-5 layout (whose 67 MB `gate_up_proj` must be read one expert slice at a time). The
conversion runs in a fresh subprocess that reports its resident size after its imports and its
peak resident size after converting; the growth must stay under 50% of the checkpoint's bytes
(it is a few tens of MB: the largest single read plus TensorStore's buffers).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from safetensors.numpy import load_file, save_file

from klotski_jax.config import ModelConfig
from klotski_jax.models.families import ExpertSource, hf_sources
from klotski_jax.models.specs import Kind, expert_part_shape, flatten, total_bytes, weight_specs

HF_CONFIG = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 1024,
    "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8,
    "num_experts_per_tok": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5, "dtype": "float32",
    "rope_theta": 1e6, "tie_word_embeddings": False,
}
FUSED_LAYER = 1
# Dense bytes 168 MB (embed and lm_head 16 MB each, 16 MB of attention per layer), experts 13 MB.
DENSE_HEAVY = {**HF_CONFIG, "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 64,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
               "num_local_experts": 2}


def _layer_tensors(cfg: ModelConfig, layer: int | None, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
    """HF tensors of one layer (None: embedding, final norm, head), random float32."""
    sources, out = hf_sources(cfg), {}
    for spec in weight_specs(cfg):
        if spec.layer != layer:
            continue
        src = sources[spec.name]
        if not isinstance(src, ExpertSource):
            out[src.key] = rng.standard_normal(spec.shape, dtype=np.float32)
        elif layer == FUSED_LAYER and spec.name.endswith("down"):
            out[src.fused[-1]] = rng.standard_normal(spec.shape, dtype=np.float32)
        elif layer == FUSED_LAYER and spec.name.endswith("gate"):
            e, (i, d) = cfg.num_experts, expert_part_shape(cfg, "gate")
            out[src.fused[-1]] = rng.standard_normal((e, 2 * i, d), dtype=np.float32)
        elif layer != FUSED_LAYER:
            part = spec.name.rsplit(".", 1)[1]
            for e in range(cfg.num_experts):
                out[src.per_expert[0].format(e=e)] = rng.standard_normal(
                    expert_part_shape(cfg, part), dtype=np.float32)
    return out


def build_checkpoint(path: pathlib.Path, hf_config: dict | None = None) -> int:
    """Write the sharded HF checkpoint; returns its tensor bytes."""
    hf_config = hf_config or HF_CONFIG
    cfg = ModelConfig.from_hf_config(hf_config)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config))
    rng = np.random.default_rng(0)
    groups = [None, *range(cfg.num_layers)]
    weight_map, total = {}, 0
    for n, layer in enumerate(groups):
        shard = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = _layer_tensors(cfg, layer, rng)
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


# Peak RSS growth of convert() alone. ru_maxrss cannot be used as is: a forked child starts with
# its parent's (pytest's, torch included) resident size as its high-water mark, which would hide
# any growth. On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) to
# the current RSS, so baseline = RSS after imports and peak = VmHWM after converting.
_CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    import numpy, ml_dtypes, tensorstore, tqdm
    from klotski_jax.checkpoints.convert import convert

    def status_kib(field):
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(field + ":")).split()[1])

    linux = os.path.exists("/proc/self/clear_refs")
    if linux:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kib("VmRSS")
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    convert(sys.argv[1], sys.argv[2], progress=False, quantize=sys.argv[3])
    dt = time.perf_counter() - t0
    peak = status_kib("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak, "seconds": dt}))
""")


def _convert_in_child(src: pathlib.Path, out: pathlib.Path, quantize: str = "none") -> int:
    """Peak RSS growth (bytes) of convert(src, out, quantize=quantize) in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), quantize],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (report["peak_kib"] - report["base_kib"]) * 1024
    print(f"RSS growth {growth / 1e6:.1f} MB, conversion {report['seconds']:.1f} s")
    return growth


def test_conversion_peak_rss_is_far_below_checkpoint_size(tmp_path) -> None:
    src, out = tmp_path / "hf", tmp_path / "ckpt"
    nbytes = build_checkpoint(src)
    assert nbytes >= 200e6
    print(f"checkpoint {nbytes / 1e6:.0f} MB")
    assert _convert_in_child(src, out) < 0.5 * nbytes

    # Spot-check both layouts in the result: chunk files are the experts' raw bytes.
    from klotski_jax.checkpoints.store import CheckpointReader

    reader = CheckpointReader(out)
    i = reader.config.expert_intermediate_size
    per_expert = load_file(str(src / "model-00002-of-00003.safetensors"))
    assert reader.expert_chunk_path(0, "up", 5).read_bytes() == per_expert[
        "model.layers.0.block_sparse_moe.experts.5.w3.weight"].tobytes()
    del per_expert
    fused = load_file(str(src / "model-00003-of-00003.safetensors"))
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]
    assert reader.expert_chunk_path(1, "gate", 7).read_bytes() == gate_up[7, :i].tobytes()
    assert reader.expert_chunk_path(1, "up", 3).read_bytes() == gate_up[3, i:].tobytes()
    assert reader.expert_chunk_path(1, "down", 2).read_bytes() == fused[
        "model.layers.1.mlp.experts.down_proj"][2].tobytes()


def test_quantized_conversion_streams_too(tmp_path) -> None:
    """--quantize int4 quantizes one expert slice at a time: the same bound holds, and the
    stored experts are the quantization of the source's (layer 1 comes from the fused layout)."""
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.models import quant

    src, out = tmp_path / "hf", tmp_path / "ckpt"
    nbytes = build_checkpoint(src)
    assert _convert_in_child(src, out, "int4") < 0.5 * nbytes
    reader = CheckpointReader(out)
    cfg = reader.config
    assert (cfg.expert_quant.value, cfg.expert_group_size) == ("int4", 64)
    fused = load_file(str(src / "model-00003-of-00003.safetensors"))
    want = quant.quantize(fused["model.layers.1.mlp.experts.down_proj"][2], cfg.expert_quant, 64)
    for name, value in want.items():
        np.testing.assert_array_equal(reader.expert(1, f"down.{name}", 2), value)


def test_dense_weights_are_not_all_held_at_once(tmp_path) -> None:
    src, out = tmp_path / "hf", tmp_path / "ckpt"
    build_checkpoint(src, DENSE_HEAVY)
    cfg = ModelConfig.from_hf_config(DENSE_HEAVY)
    dense = total_bytes(cfg, Kind.DENSE)
    assert dense >= 150e6 and dense > 10 * total_bytes(cfg, Kind.EXPERT)
    print(f"dense {dense / 1e6:.0f} MB")
    # Holding every dense array (what saving a pytree of numpy arrays does) would be >= 100%.
    assert _convert_in_child(src, out) < 0.5 * dense

    import orbax.checkpoint as ocp

    from klotski_jax.checkpoints.store import CheckpointReader

    restored = ocp.StandardCheckpointer().restore(out / "dense")
    reader = CheckpointReader(out)
    for name in ("embed", "lm_head", "layers.7.attn.o"):
        np.testing.assert_array_equal(flatten(restored)[name], reader.dense(name))
