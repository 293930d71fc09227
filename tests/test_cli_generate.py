"""`klotski generate`: every schedule at a quarter of the weights gives the reference's greedy
tokens (as far as the exactness contract pins them: tests/contract.py); the JSON Lines schemas,
the stats file, SIZE parsing and every user error (exit 2).

Two checkpoints, built once per module: the default model (16 layers, a tokenizer: text prompts,
and a 25% device budget that holds four layers' worth of weights) and a tiny 3-layer Mixtral
without a tokenizer (token-id prompts, error paths).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import sys
from typing import Any

import contract
import numpy as np
import pytest
from cli_helpers import run_cli

import klotski_jax
from klotski_jax import cli
from klotski_jax import generate_io as gio
from klotski_jax.models.specs import total_bytes
from klotski_jax.planning.policy import PolicyError, parse_size
from klotski_jax.util import NoBar, progress

PROMPTS = ["The with statement is used to", "A class", "In Python, a list comprehension"]
NEW = 4
STATS_FIELDS = (
    "schedule", "groups", "batch_size", "generated_tokens", "prefill_s", "decode_s", "total_s",
    "throughput_tokens_per_s", "bytes_read_disk", "bytes_to_device", "expert_loads", "hot_hits",
    "hot_misses", "compute_s", "io_wait_s", "peak_device_bytes", "device_budget_bytes",
    "peak_host_bytes", "host_budget_bytes", "weight_bytes", "placement", "policy")


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from klotski_jax.checkpoints.default_model import default_checkpoint

    return default_checkpoint(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def default_reference(default_ckpt: pathlib.Path) -> contract.Reference:
    """Greedy new tokens of PROMPTS from the all-resident reference model (one padded batch),
    with the teacher-forced logits that chose them (for the contract's margin rule)."""
    model = klotski_jax.load(default_ckpt)
    batch = model.tokenizer(PROMPTS, padding=True, return_tensors="np")
    return contract.reference_greedy(model, batch["input_ids"], batch["attention_mask"], NEW)


@pytest.fixture(scope="module")
def default_engine(default_ckpt: pathlib.Path) -> klotski_jax.Engine:
    """For the checkpoint's tokenizer and config (the runs themselves go through the CLI)."""
    return klotski_jax.Engine(default_ckpt)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from hf_models import save_hf_model

    root = tmp_path_factory.mktemp("tiny")
    save_hf_model("mixtral", root / "hf")
    return klotski_jax.convert(root / "hf", root / "ckpt", progress=False)




def write_lines(path: pathlib.Path, objs: list[object]) -> pathlib.Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The engine's output for the reference's tokens: up to and including the first EOS."""
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def check_text(text: str, want: list[int], pinned: int, tok: Any, eos: set[int]) -> None:
    """A printed continuation against the reference's tokens `want`, of which the contract pins
    the first `pinned` (before the row's first near-tie): all of them (up to an EOS) -> the same
    text; fewer -> the text starts with theirs (when decoding keeps that prefix at all)."""
    want = cut_at_eos(want, eos)
    full = tok.decode(want, skip_special_tokens=True)
    if pinned >= len(want):
        assert text == full, (text, full)
        return
    prefix = tok.decode(want[:pinned], skip_special_tokens=True)
    if full.startswith(prefix):
        assert text.startswith(prefix), (text, prefix)


# ---- every schedule at 25% of the weights -----------------------------------------------------
@pytest.mark.parametrize("schedule", ["klotski", "flexgen", "lru", "sequential"])
def test_every_schedule_matches_reference_at_quarter_budget(
        schedule: str, default_ckpt: pathlib.Path, default_reference: contract.Reference,
        default_engine: klotski_jax.Engine, tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    out, stats_file = tmp_path / "out.jsonl", tmp_path / "stats.json"
    rc, stdout, err = run_cli(["generate", str(default_ckpt), "--input", str(src), "--output", str(out),
                           "--max-new-tokens", str(NEW), "--schedule", schedule,
                           "--device-budget", "25%", "--stats", str(stats_file), "-q"], capsys)
    assert rc == 0, err
    assert stdout == ""  # results went to --output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok, eos = default_engine.tokenizer, set(default_engine.config.eos_token_ids)
    for i, row in enumerate(rows):
        assert set(row) == {"id", "prompt", "token_ids", "text"}
        assert (row["id"], row["prompt"]) == (i, PROMPTS[i])
        assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
    ref = default_reference
    contract.assert_greedy_matches([r["token_ids"] for r in rows], ref.tokens, ref.logits,
                                   contract.tolerance(default_engine.config.dtype), eos=eos,
                                   what=schedule)

    stats = json.loads(stats_file.read_text())
    assert set(STATS_FIELDS) <= set(stats)
    assert stats["schedule"] == schedule == stats["policy"]["schedule"]
    assert stats["device_budget_bytes"] == stats["weight_bytes"] // 4
    assert 0 < stats["peak_device_bytes"] <= stats["device_budget_bytes"]
    assert stats["generated_tokens"] == sum(len(r["token_ids"]) for r in rows)
    assert stats["placement"]["schedule"] == schedule
    assert stats["placement"]["min_device_bytes"] <= stats["device_budget_bytes"]
    assert stats["bytes_to_device"] > 0 and stats["expert_loads"] > 0  # it really streamed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ablations_match_reference(default_ckpt: pathlib.Path, default_reference: contract.Reference,
                                   default_engine: klotski_jax.Engine, tmp_path: pathlib.Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """All three klotski ablations off, at 30% of the weights, text prompts on the command line,
    O_DIRECT reads of files just evicted from the page cache, a pinned_host expert cache."""
    argv = ["generate", str(default_ckpt), "--max-new-tokens", str(NEW), "--device-budget", "30%",
            "--no-multi-batch", "--no-hot-only-prefetch", "--no-reorder",
            "--io-mode", "direct", "--evict-page-cache", "--pinned-host", "on",
            "--stats", str(tmp_path / "s.json"), "-q"]
    rc, stdout, err = run_cli(argv + [a for p in PROMPTS for a in ("--prompt", p)], capsys)
    assert rc == 0, err
    tok, eos = default_engine.tokenizer, set(default_engine.config.eos_token_ids)
    texts = [json.loads(line) for line in stdout.splitlines()]  # one JSON string per prompt
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)
    ref = default_reference
    pinned = contract.guaranteed_lengths(ref.logits, contract.tolerance(default_engine.config.dtype))
    for text, want, k in zip(texts, ref.tokens.tolist(), pinned, strict=True):
        check_text(text, want, k, tok, eos)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["device_budget_bytes"] == int(stats["weight_bytes"] * 0.30)
    assert stats["policy"]["multi_batch"] is stats["policy"]["reorder"] is False
    assert stats["policy"]["hot_only_prefetch"] is False
    assert stats["policy"]["io_mode"] == "direct" and stats["policy"]["evict_page_cache"] is True
    assert stats["policy"]["pinned_host"] is True


# ---- token-id prompts, the output schema, stdout ----------------------------------------------
def test_token_id_jsonl_schema(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    prompts = [[5, 17, 33, 8, 9], [40, 41], [7, 7, 7]]
    lines = [{"prompt_token_ids": p, "meta": {"n": i}} for i, p in enumerate(prompts)]
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps(lines[0]) + "\n\n" + "".join(json.dumps(x) + "\n" for x in lines[1:]))
    out = tmp_path / "sub" / "out.jsonl"
    rc, _, err = run_cli(["generate", str(tiny_ckpt), "--input", str(src), "--output", str(out),
                      "--max-new-tokens", "5", "--groups", "2", "--batch-size", "1", "-q"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    model = klotski_jax.load(tiny_ckpt)
    eos = set(model.config.eos_token_ids)
    for line, row in zip(lines, rows, strict=True):
        assert set(row) == {"prompt_token_ids", "meta", "token_ids"}  # no tokenizer: no "text"
        assert {k: row[k] for k in line} == line
        ids = np.asarray([line["prompt_token_ids"]], np.int32)
        ref = contract.reference_greedy(model, ids, np.ones_like(ids), 5)
        contract.assert_greedy_matches([row["token_ids"]], ref.tokens, ref.logits,
                                       contract.tolerance(model.config.dtype), eos=eos)

    rc, stdout, err = run_cli(["generate", str(tiny_ckpt), "--input", str(src), "--max-new-tokens",
                           "5", "--groups", "2", "--batch-size", "1"], capsys)
    assert rc == 0, err
    assert [json.loads(x) for x in stdout.splitlines()] == [r["token_ids"] for r in rows]
    assert "tok/s" in err  # the summary line (not with -q)


def test_progress_bar_on_a_tty(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar counts generated tokens (prompts x new tokens); -q or a non-TTY turns it off."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4]}] * 2)
    assert cli.main(["generate", str(tiny_ckpt), "--input", str(src), "--max-new-tokens", "3",
                     "--output", str(tmp_path / "o.jsonl")]) == 0
    assert "generating" in err.getvalue() and "/6 " in err.getvalue()
    assert isinstance(progress(6, unit="tok", quiet=True), NoBar)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(6, unit="tok", quiet=False), NoBar)


def test_compiled_steps_persist_across_runs(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path
                                            ) -> None:
    """The klotski command keeps its compiled steps in the per-user cache (<cache>/xla): a
    second run of the same shapes compiles nothing new; KLOTSKI_JAX_COMPILE_CACHE=off (or an
    explicit JAX_COMPILATION_CACHE_DIR, which this suite sets) decides otherwise."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env["KLOTSKI_JAX_CACHE"] = str(tmp_path / "cache")
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]}])
    cmd = [sys.executable, "-m", "klotski_jax.cli", "generate", str(tiny_ckpt), "--input",
           str(src), "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "3", "-q"]

    def entries() -> set[str]:
        where = tmp_path / "cache" / "xla"
        return {p.name for p in where.iterdir()} if where.exists() else set()

    def run(**extra: str) -> None:
        done = subprocess.run(cmd, env=env | extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    run(KLOTSKI_JAX_COMPILE_CACHE="off")
    assert entries() == set()
    run()
    first = entries()
    assert len(first) >= 5  # attention, router, combine, expert buckets, logits, ...
    run()
    assert entries() == first  # every step of the same shapes came from the cache


# ---- sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30),
                                        ("30%", 300), ("1.5k", 1536), ("4096", 4096),
                                        (" 2 gib ", 2 * 2**30)])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text, total=1000) == want
    assert gio.resolve_size(text, weight_bytes=1000) == want


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5MB", "0", "0%", "%", "30 %%", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(PolicyError, match="size|percentage"):
        parse_size(text, total=1000)


def test_size_forms_on_the_command_line(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    weights = total_bytes(klotski_jax.Engine(tiny_ckpt).config)
    base = ["generate", str(tiny_ckpt), "--prompt", "x"]
    assert gio.resolve_size(None, weight_bytes=weights) is None
    assert gio.resolve_size("unlimited", weight_bytes=weights) is None
    with pytest.raises(PolicyError, match="nothing to take it of"):
        parse_size("30%")
    rc, _, err = run_cli(base + ["--device-budget", "12XB"], capsys)
    assert rc == 2 and "error: cannot parse size '12XB'" in err
    rc, _, err = run_cli(base + ["--host-budget", "-1GB"], capsys)
    assert rc == 2 and "error:" in err
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]}])
    rc, _, err = run_cli(["generate", str(tiny_ckpt), "--input", str(src), "--max-new-tokens", "2",
                      "--device-budget", "2GiB", "--host-budget", "512MB", "-q",
                      "--stats", str(tmp_path / "s.json")], capsys)
    assert rc == 0, err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert (stats["device_budget_bytes"], stats["host_budget_bytes"]) == (2 * 2**30, 512 * 10**6)
    assert stats["peak_host_bytes"] <= stats["host_budget_bytes"]


# ---- user errors: exit 2, one error line, no output files -------------------------------------
def test_budget_below_minimum(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]}])
    out, stats, trace = tmp_path / "o.jsonl", tmp_path / "s.json", tmp_path / "t.json"
    rc, stdout, err = run_cli(["generate", str(tiny_ckpt), "--input", str(src), "--output", str(out),
                           "--stats", str(stats), "--trace", str(trace), "--device-budget", "1KB",
                           "-q"], capsys)
    assert rc == 2
    assert err.startswith("error: device budget 1000 bytes is below the minimum"), err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists() and not stats.exists() and not trace.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_prompt_past_max_positions_is_refused(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Prompt tokens + new tokens past max_position_embeddings: refused, naming the line, unless
    --allow-long-context; the Python API refuses it too."""
    limit = klotski_jax.Engine(tiny_ckpt).config.max_position_embeddings
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4]},
                                             {"prompt_token_ids": [5] * (limit - 2)}])
    out = tmp_path / "o.jsonl"
    argv = ["generate", str(tiny_ckpt), "--input", str(src), "--output", str(out),
            "--max-new-tokens", "3", "-q"]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and not out.exists(), err
    assert err.startswith("error: ") and "p.jsonl:2: " in err and "Traceback" not in err, err
    assert f"{limit - 2} prompt tokens + 3 new tokens = {limit + 1} positions" in err
    assert f"max_position_embeddings {limit}" in err and "--allow-long-context" in err
    rc, _, err = run_cli(argv + ["--allow-long-context"], capsys)
    assert rc == 0 and out.exists(), err
    with pytest.raises(ValueError, match=r"prompt 0: .* more than the model's max_position"):
        klotski_jax.Engine(tiny_ckpt).generate([[5] * limit], max_new_tokens=1)


def test_seeded_sampling_repeats_through_the_cli(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--temperature with --top-k / --top-p / --min-p and a seed: the same tokens twice; bad
    filter values are refused by the engine."""
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]},
                                             {"prompt_token_ids": [6, 7]}])
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.jsonl"
        rc, _, err = run_cli(["generate", str(tiny_ckpt), "--input", str(src), "--output", str(out),
                              "--max-new-tokens", "4", "--temperature", "1.2", "--top-k", "20",
                              "--top-p", "0.9", "--min-p", "0.01", "--seed", "5", "-q"], capsys)
        assert rc == 0, err
        outs.append([json.loads(line)["token_ids"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        klotski_jax.Engine(tiny_ckpt).generate([[3, 4]], max_new_tokens=1, top_k=-1)
    with pytest.raises(ValueError, match="min_p must be in"):
        klotski_jax.Engine(tiny_ckpt).generate([[3, 4]], max_new_tokens=1, min_p=1.5)


def test_damaged_expert_chunk_is_named(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated expert chunk: one `error:` line naming layer, expert and part, exit 2, no
    traceback, no output files."""
    import shutil

    from klotski_jax.checkpoints.store import CheckpointReader

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    moe = CheckpointReader(ckpt).config.moe_layer_ids[0]
    for e in range(CheckpointReader(ckpt).config.num_experts):  # whichever expert is routed
        chunk = CheckpointReader(ckpt).expert_chunk_path(moe, "up", e)
        os.truncate(chunk, 100)
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]}])
    out = tmp_path / "o.jsonl"
    rc, stdout, err = run_cli(["generate", str(ckpt), "--input", str(src), "--output", str(out),
                               "--max-new-tokens", "2", "-q"], capsys)
    assert rc == 2, err
    assert err.startswith(f"error: {ckpt}: layer {moe} expert "), err
    assert "(up): truncated: 100 of " in err and "klotski convert" in err
    assert "Traceback" not in err and stdout == "" and not out.exists()


@pytest.mark.parametrize("damage", ["overwritten", "missing", "dense"])
def test_changed_or_missing_files_are_refused_unless_no_verify(
        tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        damage: str) -> None:
    """Bytes overwritten in place (same size) fail the expert's checksum on its first read, a
    deleted chunk is named as missing, a changed dense file is caught at start-up: exit 2 and
    one error line; `--no-verify` skips the checksums (an overwritten chunk then runs)."""
    import shutil

    from klotski_jax.checkpoints.store import CheckpointReader

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    reader = CheckpointReader(ckpt)
    moe = reader.config.moe_layer_ids[0]
    for e in range(reader.config.num_experts):  # whichever expert is routed
        chunk = reader.expert_chunk_path(moe, "up", e)
        if damage == "missing":
            chunk.unlink()
        elif damage == "overwritten":
            data = bytearray(chunk.read_bytes())
            data[::7] = bytes(len(data[::7]))
            data[1] ^= 0x55
            chunk.write_bytes(bytes(data))
    if damage == "dense":
        norm = next(p for p in (ckpt / "dense" / f"layers.{moe}.attn_norm").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
        norm.write_bytes(norm.read_bytes()[:-2] + b"\x01\x02")
    src = write_lines(tmp_path / "p.jsonl", [{"prompt_token_ids": [3, 4, 5]}])
    argv = ["generate", str(ckpt), "--input", str(src), "--max-new-tokens", "2", "-q"]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and "Traceback" not in err and stdout == "", err
    want = {"overwritten": f"layer {moe} expert ", "missing": f"layer {moe} expert ",
            "dense": f"tensor 'layers.{moe}.attn_norm'"}[damage]
    assert err.startswith(f"error: {ckpt}: {want}"), err
    assert {"overwritten": "(up): checksum mismatch", "missing": "(up): missing",
            "dense": ": checksum mismatch"}[damage] in err
    if damage == "overwritten":
        rc, stdout, err = run_cli([*argv, "--no-verify"], capsys)
        assert rc == 0, err


@pytest.mark.parametrize("line, why", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "x"}', "neither"),
    ('{"prompt": "x", "prompt_token_ids": [1]}', "both"),
    ('{"prompt": ""}', "non-empty string"),
    ('{"prompt": 5}', "non-empty string"),
    ('{"prompt_token_ids": []}', "non-empty list of integers"),
    ('{"prompt_token_ids": [1, "2"]}', "non-empty list of integers"),
    ('{"prompt_token_ids": [1, true]}', "non-empty list of integers"),
    ('{"prompt_token_ids": [1, 2.5]}', "non-empty list of integers"),
])
def test_bad_jsonl_line_is_named(line: str, why: str, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt_token_ids": [1, 2]}\n' + line + "\n")
    with pytest.raises(gio.InputError, match=f"prompts.jsonl:2: .*{why}"):
        gio.read_prompts(src)


def test_bad_inputs_exit_2(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.jsonl"
    base = ["generate", str(tiny_ckpt), "--output", str(out), "-q"]
    cases = {
        "bad.jsonl:3: not valid JSON": ('{"prompt_token_ids": [1]}\n\n{oops\n', []),
        "vocab.jsonl:2: token ids outside the vocabulary [0, 96): [96, -1]":
            ('{"prompt_token_ids": [1]}\n{"prompt_token_ids": [5, 96, -1]}\n', []),
        "empty.jsonl: no prompts": ("\n\n", []),
        "text.jsonl:2: a text prompt, but the checkpoint has no tokenizer":
            ('{"prompt_token_ids": [1]}\n{"prompt": "hello"}\n', []),
    }
    for want, (text, extra) in cases.items():
        src = tmp_path / want.split(":")[0]
        src.write_text(text)
        rc, _, err = run_cli(base + ["--input", str(src), *extra], capsys)
        assert rc == 2 and f"{src.name}:" in err and want.split(":", 1)[1].strip() in err, err
    rc, _, err = run_cli(base + ["--prompt", "hi"], capsys)
    assert rc == 2 and "error: --prompt 1: a text prompt, but the checkpoint has no tokenizer" in err
    rc, _, err = run_cli(base + ["--input", str(tmp_path / "missing.jsonl")], capsys)
    assert rc == 2 and "missing.jsonl: no such prompt file" in err
    rc, _, err = run_cli(["generate", str(tmp_path / "nockpt"), "--prompt", "x"], capsys)
    assert rc == 2 and "not a klotski-jax checkpoint" in err
    assert not out.exists()
    assert logging.getLogger("jax").level == logging.WARNING  # no "Unable to initialize backend"


@pytest.mark.parametrize("argv", [
    ["demo", "--max-new-tokens", "0"],
    ["generate", "C", "--prompt", "x", "--max-new-tokens", "0"],
    ["generate", "C", "--prompt", "x", "--top-p", "0"],
    ["generate", "C", "--prompt", "x", "--temperature", "-1"],
    ["generate", "C", "--prompt", "x", "--groups", "0"],
    ["generate", "C", "--prompt", "x", "--schedule", "fifo"],
    ["generate", "C", "--prompt", "x", "--pinned-host", "yes"],
    ["generate", "C", "--prompt", "x", "--expert-batch", "3"],
    ["bench", "C", "--expert-batch", "0"],
    ["generate", "C", "--prompt", "x", "--schedule", "lru", "--no-reorder"],
    ["generate", "C", "--prompt", "x", "--schedule", "flexgen", "--no-hot-only-prefetch"],
    ["generate", "C", "--prompt", "x", "--schedule", "sequential", "--no-multi-batch"],
    ["generate", "C"],
    ["generate", "C", "--prompt", "x", "--input", "p.jsonl"],
])
def test_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "error:" in err


def test_write_atomic_keeps_old_file_on_failure(tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = gio.write_jsonl(tmp_path / "o.jsonl", [{"a": 1}])

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gio.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        gio.write_jsonl(path, [{"a": 2}])
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # the temp file is gone


def test_outputs_get_ordinary_permissions(tmp_path: pathlib.Path) -> None:
    """mkstemp makes 0600 files; outputs get what open() would give (0666 less the umask)."""
    mask = os.umask(0o022)
    try:
        path = gio.write_json(tmp_path / "s.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
