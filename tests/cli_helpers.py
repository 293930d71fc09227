"""Shared helpers for the CLI tests (no torch import, so torch-less tests can use them)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from klotski_jax import cli


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """cli.main(argv) -> (exit status, stdout, stderr); argparse's SystemExit becomes a status."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = int(e.code)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_generate_matches_reference(ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str], budget: str) -> None:
    """`klotski generate` on two token-id prompts of `ckpt` at `--device-budget budget` gives
    the reference model's greedy tokens (by the exactness contract's margin rule)."""
    import contract  # tests/ is on sys.path (conftest)

    import klotski_jax

    model = klotski_jax.load(ckpt)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    rc, _, err = run_cli(["generate", str(ckpt), "--input", str(src), "--output", str(out),
                          "--max-new-tokens", "4", "--device-budget", budget, "-q"], capsys)
    assert rc == 0, err
    for row, p in zip(map(json.loads, out.read_text().splitlines()), prompts, strict=True):
        want = model.generate_reference(np.asarray([p], np.int32), 4)[0, len(p):].tolist()
        logits = model.logits(np.asarray([p + want[:-1]], np.int32))[:, len(p) - 1:]
        contract.assert_greedy_matches([row["token_ids"]], np.asarray([want]), logits,
                                       contract.tolerance(model.config.dtype))
