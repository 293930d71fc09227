"""Training code (klotski_jax/models/training.py) and the default model's training script.

- the training forward over the NNX model is the reference model's forward (the same `Model`,
  the same logits), for every family quirk it supports;
- the load-balancing loss equals transformers' `load_balancing_loss_func`;
- gradients reach every weight, a few steps lower the loss, and a rerun repeats the loss curve;
- the corpus rules of scripts/train_default_model.py pick exactly the documented docstrings;
- the script itself runs end to end on a tiny config in CI (`--tiny --steps 5`), and a tiny run
  stopped early and resumed from its orbax checkpoint repeats the uninterrupted loss curve.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import sys
import textwrap
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klotski_jax.config import ModelConfig
from klotski_jax.demo import PROMPTS
from klotski_jax.models import layers
from klotski_jax.models import training as T
from klotski_jax.models.modules import MoEModel
from klotski_jax.models.reference import Model
from klotski_jax.models.specs import weight_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_cfg(**changes: object) -> ModelConfig:
    hf = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_local_experts": 4, "num_experts_per_tok": 2, "dtype": "float32"}
    return ModelConfig.from_hf_config(hf).replace(**changes)


def hf_family_cfg(name: str) -> ModelConfig:
    """The ModelConfig of one of tests/hf_models.py's tiny HF configs (family quirks)."""
    pytest.importorskip("torch")
    from hf_models import make_hf_model

    return ModelConfig.from_hf_config(make_hf_model(name).config.to_dict()).replace(dtype="float32")


def perturbed_params(cfg: ModelConfig, seed: int = 0) -> T.Params:
    """init_params with larger weights and non-trivial norms/biases, so routing and every
    quirk matter (flat names)."""
    params = T.init_params(cfg, seed, std=0.2)
    key = jax.random.PRNGKey(seed + 1)
    for i, (name, w) in enumerate(sorted(params.items())):
        if name.endswith(("norm", "bias")):
            params[name] = w + 0.1 * jax.random.normal(jax.random.fold_in(key, i), w.shape)
    return params


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> MoEModel:
    return T.model_from_params(cfg, perturbed_params(cfg, seed))


@pytest.mark.parametrize("name", ["mixtral", "mixtral-odd", "qwen2_moe", "qwen3_moe", "olmoe-clip"])
def test_forward_train_equals_reference_model(name: str) -> None:
    cfg = hf_family_cfg(name)
    model = Model.from_weights(cfg, perturbed_params(cfg))  # the reference model itself
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    logits, router_logits = nnx.jit(T.forward_train)(model, jnp.asarray(ids))
    ref = model.logits(ids)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert len(router_logits) == sum(cfg.moe_layers)
    assert all(r.shape == (ids.size, cfg.num_experts) for r in router_logits)


@pytest.mark.parametrize("skew", ["random", "one-expert", "few-tokens"])
def test_combine_grouped_equals_dense_in_value_and_gradient(skew: str) -> None:
    """Training's expert-sorted blocks compute exactly the oracle's sum, and the same gradients
    for the inputs, the router weights and every expert's matrices (an unused expert gets 0)."""
    rng = np.random.default_rng(7)
    n, d, f, e, k = (5 if skew == "few-tokens" else 150), 16, 12, 6, 2
    experts = {"gate": rng.normal(0, 0.3, (e, f, d)), "up": rng.normal(0, 0.3, (e, f, d)),
               "down": rng.normal(0, 0.3, (e, d, f))}
    experts = {name: jnp.asarray(w, jnp.float32) for name, w in experts.items()}
    x = jnp.asarray(rng.normal(0, 1, (n, d)), jnp.float32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    if skew == "one-expert":  # every token's first choice is expert 3: one long padded run
        idx = np.stack([np.full(n, 3), rng.integers(4, e, n)], axis=1)
    else:
        idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    idx = jnp.asarray(idx, jnp.int32)

    def total(fn, ex, xx, ww):  # a scalar that depends on every output element differently
        return jnp.sum(fn(ex, xx, ww, idx) * jnp.arange(n * d, dtype=jnp.float32).reshape(n, d))

    dense = functools.partial(total, layers.combine_dense)
    grouped = functools.partial(total, lambda *a: layers.combine_grouped(*a, block=8))
    np.testing.assert_allclose(np.asarray(layers.combine_grouped(experts, x, weights, idx, block=8)),
                               np.asarray(layers.combine_dense(experts, x, weights, idx)),
                               rtol=1e-5, atol=1e-5)
    g_dense = jax.grad(dense, argnums=(0, 1, 2))(experts, x, weights)
    g_grouped = jax.jit(jax.grad(grouped, argnums=(0, 1, 2)))(experts, x, weights)
    for a, b in zip(jax.tree.leaves(g_grouped), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(b).max()))
    unused = sorted(set(range(e)) - set(np.asarray(idx).ravel().tolist()))
    for name in ("gate", "up", "down"):
        assert all(float(jnp.abs(g_grouped[0][name][u]).max()) == 0 for u in unused)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked: bool) -> None:
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(1)
    batch, seq, experts, top_k = 3, 7, 8, 2
    logits = [rng.normal(0, 2, (batch * seq, experts)).astype(np.float32) for _ in range(4)]
    mask = (rng.random((batch, seq)) > 0.3).astype(np.int64) if masked else None
    want = load_balancing_loss_func(tuple(torch.tensor(x) for x in logits), experts, top_k,
                                    None if mask is None else torch.tensor(mask))
    got = T.load_balancing_loss([jnp.asarray(x) for x in logits], experts, top_k,
                                None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    # perfectly balanced routing gives top_k
    uniform = [jnp.tile(jnp.eye(experts) * 5, (2, 1))]  # every expert first in 2 rows
    assert abs(float(T.load_balancing_loss(uniform, experts, 1)) - 1.0) < 1e-3


def test_gradients_reach_every_weight() -> None:
    cfg = tiny_cfg()
    model = perturbed_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 17)), jnp.int32)
    grads, metrics = nnx.jit(nnx.grad(T.loss_fn, has_aux=True))(model, tokens, 0.02)
    grads = {".".join(map(str, path)): g[...] for path, g in grads.flat_state()}
    assert set(grads) == {s.name for s in weight_specs(cfg)} == set(T.flat_params(model))
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
        assert float(jnp.abs(g).max()) > 0, name  # 64 tokens x top-2 reach all 4 experts
    assert 2.0 <= float(metrics["aux"]) <= 4.0  # top-2 of 4: 2 balanced, 4 collapsed


def test_fit_lowers_the_loss_repeats_its_curve_and_resumes_on_it(tmp_path: pathlib.Path) -> None:
    """A second run of the same seed repeats the loss curve; stopped after 7 steps and resumed
    from its orbax checkpoint, it continues on the curve of the uninterrupted run."""
    cfg = tiny_cfg()
    rng = np.random.default_rng(3)
    pattern = rng.integers(4, cfg.vocab_size, 8)
    windows = np.stack([np.roll(np.tile(pattern, 3), -i)[:17] for i in range(8)]).astype(np.int32)
    tc = T.TrainConfig(steps=12, peak_lr=1e-2, warmup_steps=2)
    _, first = T.fit(cfg, tc, windows, windows[:4], batch_size=4, seed=5, eval_every=6)
    ckpts = T.TrainCheckpoints(tmp_path / "ckpt", every=0)  # after the last step only
    _, part = T.fit(cfg, tc, windows, windows[:0], batch_size=4, seed=5, steps_to_run=7,
                    checkpoints=ckpts)
    assert ckpts.steps() == [7]
    with pytest.raises(T.CheckpointError, match="holds checkpoints"):  # never starts over them
        T.fit(cfg, tc, windows, windows[:0], batch_size=4, seed=5, checkpoints=ckpts)
    with pytest.raises(T.CheckpointError, match=r"different run configuration \(seed: checkpoint 5"):
        T.fit(cfg, tc, windows, windows[:0], batch_size=4, seed=6, checkpoints=ckpts, resume=True)
    _, again = T.fit(cfg, tc, windows, windows[:0], batch_size=4, seed=5, checkpoints=ckpts,
                     resume=True)
    ckpts.close()
    assert ckpts.steps() == [7, 12]
    ckpts.clear()  # what the script's --restart does
    assert ckpts.steps() == [] and not ckpts.directory.exists()
    assert again["steps"][:7] == part["steps"] and again["resumed_at"] == [7]
    losses = [s["loss"] for s in first["steps"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5  # a periodic text is easy to learn
    assert first["evals"][-1]["val_loss"] < first["evals"][0]["val_loss"]
    assert [e["step"] for e in first["evals"]] == [0, 6, 12]
    again_losses = [s["loss"] for s in again["steps"]]
    np.testing.assert_allclose(losses[:7], again_losses[:7], rtol=0, atol=1e-6)  # a rerun
    np.testing.assert_allclose(losses, again_losses, rtol=1e-5)  # resumed: the same curve
    lrs = [s["lr"] for s in first["steps"]]
    np.testing.assert_allclose(lrs[:3], [5e-3, 7.5e-3, 1e-2], rtol=1e-5)  # warm-up from peak / 2
    assert 1e-3 <= lrs[-1] < 2e-3  # cosine decay towards 10% of the peak at step 12


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    order = T.batch_order(10, 3, 7, seed=0)  # 3 batches per epoch (one window left out)
    assert order.shape == (7, 3)
    for epoch in range(2):
        seen = order[3 * epoch: 3 * epoch + 3].ravel()
        assert len(set(seen)) == 9
    np.testing.assert_array_equal(order, T.batch_order(10, 3, 7, seed=0))
    assert not np.array_equal(order, T.batch_order(10, 3, 7, seed=1))
    with pytest.raises(ValueError, match="cannot fill"):
        T.batch_order(2, 3, 1, seed=0)


def test_routing_skew_counts_every_assignment() -> None:
    cfg = tiny_cfg()
    model = perturbed_model(cfg)
    windows = np.random.default_rng(4).integers(0, cfg.vocab_size, (5, 9)).astype(np.int32)
    skew = T.routing_skew(model, windows, batch_size=2)
    assert skew["windows"] == 5 and skew["tokens"] == 5 * 8
    for layer in range(cfg.num_layers):
        shares = skew["expert_shares"][layer]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert skew["top2_share"][layer] == pytest.approx(sum(sorted(shares)[-2:]), abs=1e-3)
        assert 0.5 <= skew["top2_share"][layer] <= 1.0  # top-2 of 4 experts
        assert skew["top2_share_per_window"][layer] >= skew["top2_share"][layer] - 1e-3


# ---- the script -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def script() -> ModuleType:
    path = ROOT / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_stdlib_corpus_rules(script: ModuleType, tmp_path: pathlib.Path) -> None:
    files = {
        "json/__init__.py": ('"""JSON encoder."""\ndef dumps(obj, *, indent=None):\n'
                             '    """Serialize."""\n'),
        "json/decoder.py": textwrap.dedent('''\
            class JSONDecoder(object):
                """Simple decoder."""
                def decode(self, s):
                    """Decode s."""
                    def inner():
                        """nested: skipped"""
                def _private(self):
                    """skipped"""
            def _helper():
                """skipped"""
            '''),
        "nodoc.py": "x = 1\n",
        "test/test_json.py": '"""excluded"""\n',
        "site-packages/pkg.py": '"""excluded"""\n',
        "config-3.11-x86_64-linux-gnu/python-config.py": '"""excluded"""\n',
        "broken.py": "def (:\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    docs = script.stdlib_documents(tmp_path)
    assert docs == [
        ("module:json", "Module json\n\nJSON encoder.\n\ndumps(obj, *, indent=None)\n\nSerialize."),
        ("module:json.decoder", "Module json.decoder\n\nclass JSONDecoder(object)\n\n"
                                "Simple decoder.\n\nJSONDecoder.decode(self, s)\n\nDecode s."),
    ]


def test_corpus_split_is_deterministic_and_disjoint(script: ModuleType) -> None:
    from pydoc_data.topics import topics

    train, val = script.corpus_documents(tiny=True)
    assert sorted(d for d, _ in train + val) == [f"topic:{k}" for k in sorted(topics)]
    assert [d for d, _ in train] == sorted(d for d, _ in train)  # in a fixed order
    assert val and all(script.is_validation(d) for d, _ in val)
    assert not any(script.is_validation(d) for d, _ in train)
    assert script.corpus_documents(tiny=True) == (train, val)


@pytest.fixture(scope="module")
def tiny_run(script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """An uninterrupted `--tiny --steps 5` run with its export: ROOT/run (run dir) and
    ROOT/model (the HF checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    assert script.main(["--tiny", "--steps", "5", "--run-dir", str(root / "run"),
                        "--out-dir", str(root / "model"), "--sample-tokens", "2"]) == 0
    return root


def test_script_tiny_run(script: ModuleType, tiny_run: pathlib.Path) -> None:
    """`--tiny --steps 5`: trains, lowers the validation loss, checkpoints, exports an HF
    checkpoint with a model card and the log; transformers loads it."""
    tmp_path, out = tiny_run, tiny_run / "model"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["5"]  # the last
    record = json.loads((out / "training_log.json").read_text())
    evals = record["evals"]
    assert [e["step"] for e in evals] == [0, 5] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert len(record["steps"]) == 5 and record["steps"][-1]["tokens"] == 5 * 4 * 32
    export = record["export"]
    assert abs(export["val_loss"] - evals[-1]["val_loss"]) < 0.01  # bf16 export ~ float32 weights
    assert len(export["routing"]["top2_share"]) == 2 and len(export["samples"]) == len(PROMPTS)
    assert [s["prompt"] for s in export["samples_penalised"]] == list(PROMPTS)

    # --remeasure measures the exported checkpoint again and keeps the training record
    (out / "README.md").write_text("stale")
    assert script.main(["--tiny", "--remeasure", "--run-dir", str(tmp_path / "run"),
                        "--out-dir", str(out)]) == 0
    again = json.loads((out / "training_log.json").read_text())
    assert again["steps"] == record["steps"] and again["command"] == record["command"]
    assert abs(again["export"]["val_loss"] - export["val_loss"]) < 1e-6
    assert again["export"]["samples"] == export["samples"]  # greedy: the same text
    assert f"{export['val_loss']:.3f}" in (out / "README.md").read_text()
    card = (out / "README.md").read_text()
    assert f"{export['val_loss']:.3f}" in card and record["command"] in card
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "training_log.json"]

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    model, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == model.config.vocab_size == 512

    with pytest.raises(FileExistsError, match="--overwrite"):  # never replaces silently
        script.main(["--tiny", "--steps", "1", "--run-dir", str(tmp_path / "run"),
                     "--out-dir", str(out), "--sample-tokens", "1"])


def test_script_resume_repeats_the_uninterrupted_loss_curve(
        script: ModuleType, tiny_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The tiny run stopped after 3 of 5 steps (checkpoints every 2) and resumed with --resume
    logs the loss curve of the uninterrupted run; resuming without a checkpoint or starting
    fresh over checkpoints fails with a clear message (another configuration's checkpoint:
    test_fit_lowers_the_loss_repeats_its_curve_and_resumes_on_it)."""
    part = tmp_path / "part"
    run = lambda *args: script.main(["--tiny", "--steps", "5", "--checkpoint-every", "2",
                                     "--run-dir", str(part), *args])
    with pytest.raises(T.CheckpointError, match="no checkpoint"):
        run("--resume", "--stop-after", "5")
    assert not (part / "checkpoints").exists()

    assert run("--stop-after", "3") == 0
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["2", "3"]
    with pytest.raises(T.CheckpointError, match="--resume.*--restart"):  # never clobbers them
        run("--stop-after", "3")
    assert run("--resume", "--stop-after", "5") == 0
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["3", "4", "5"]  # 3 kept

    want = json.loads((tiny_run / "model" / "training_log.json").read_text())
    got = json.loads((part / "training_log-stop5.json").read_text())
    assert [s["step"] for s in got["steps"]] == [1, 2, 3, 4, 5]
    for key in ("loss", "ce", "aux", "grad_norm", "lr"):
        np.testing.assert_allclose([s[key] for s in got["steps"]], [s[key] for s in want["steps"]],
                                   rtol=1e-5, err_msg=key)
    assert [e["step"] for e in got["evals"]] == [0, 3, 5]  # the stop at 3 evaluated too
    val = {e["step"]: e["val_loss"] for e in got["evals"]}
    np.testing.assert_allclose([val[e["step"]] for e in want["evals"]],
                               [e["val_loss"] for e in want["evals"]], rtol=1e-5)
    assert got["resumed_at"] == [3] and want["resumed_at"] == []
    assert "--resume" not in got["command"]  # the run it completes
