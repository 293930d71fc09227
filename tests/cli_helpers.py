"""Shared helpers for the CLI tests (no torch import, so torch-less tests can use them)."""

from __future__ import annotations

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
