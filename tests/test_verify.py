"""Checkpoint integrity: the manifest's checksums (recorded at conversion) and `klotski verify`.

Damage a user can meet (a truncated chunk, bytes overwritten in place, a deleted file, a dense
array changed) is reported by layer, expert and part (or tensor), exit 2; a clean checkpoint
exits 0; a checkpoint converted before checksums existed is named as such and still loads.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from cli_helpers import run_cli
from hf_models import save_hf_model

import klotski_jax
from klotski_jax.checkpoints import checksums
from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints.errors import ManifestError
from klotski_jax.checkpoints.store import CheckpointReader


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    _, path = save_hf_model("mixtral", tmp_path_factory.mktemp("hf") / "hf")
    return path


@pytest.fixture(scope="module")
def clean(hf_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return klotski_jax.convert(hf_dir, tmp_path_factory.mktemp("ckpt") / "ckpt", progress=False)


def _copy(ckpt: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(ckpt, dst)
    return dst


def test_every_file_is_recorded_and_a_clean_checkpoint_verifies(
        clean: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = json.loads((clean / mf.MANIFEST_FILE).read_text())
    files = {p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file()}
    assert set(m["checksums"]["files"]) == files - {mf.MANIFEST_FILE}
    assert m["checksums"]["algorithm"] == "xxh3_64"
    for rel, e in m["checksums"]["files"].items():  # hashed while writing == the file's bytes
        assert (e["size"], e["xxh3_64"]) == checksums.file_digest(clean / rel)
    rc, out, err = run_cli(["verify", str(clean), "-q"], capsys)
    assert rc == 0, err
    total = sum(e["size"] for e in m["checksums"]["files"].values())
    assert out.startswith(f"ok: {len(files) - 1} files ({total / 1e6:,.1f} MB)")


def test_damage_is_reported_by_layer_expert_and_part(clean: pathlib.Path,
                                                      tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = _copy(clean, tmp_path / "bad")
    reader = CheckpointReader(bad)
    truncated = reader.expert_chunk_path(1, "up", 2)
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:1000 if size > 1000 else size // 2])
    overwritten = reader.expert_chunk_path(0, "down", 3)
    data = bytearray(overwritten.read_bytes())
    data[::7] = bytes(len(data[::7]))  # every 7th byte zeroed, same size
    data[0] ^= 0xFF
    overwritten.write_bytes(bytes(data))
    reader.expert_chunk_path(2, "gate", 1).unlink()
    dense = next(p for p in (bad / "dense" / "layers.0.attn.q").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    dense.write_bytes(dense.read_bytes()[:-1] + b"\x00")
    rc, _, err = run_cli(["verify", str(bad), "-q"], capsys)
    assert rc == 2
    assert f"layer 1 expert 2 (up): truncated: {min(1000, size // 2)} of {size} bytes" in err
    assert "layer 0 expert 3 (down): checksum mismatch" in err
    assert "layer 2 expert 1 (gate): missing" in err
    assert "tensor 'layers.0.attn.q'" in err and "4 bad of" in err
    rc, _, err = run_cli(["verify", str(bad), "--experts-only", "-q"], capsys)
    assert rc == 2 and "3 bad of" in err and "layers.0.attn.q" not in err


def test_quantized_store_verifies(hf_dir: pathlib.Path, tmp_path: pathlib.Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = klotski_jax.convert(hf_dir, tmp_path / "int8", progress=False, quantize="int8")
    rc, _, err = run_cli(["verify", str(ckpt), "-q"], capsys)
    assert rc == 0, err
    chunk = CheckpointReader(ckpt).expert_chunk_path(0, "up.scale", 1)
    chunk.write_bytes(chunk.read_bytes()[::-1])
    rc, _, err = run_cli(["verify", str(ckpt), "-q"], capsys)
    assert rc == 2 and "layer 0 expert 1 (up.scale): checksum mismatch" in err


def test_checkpoints_without_checksums_still_load(clean: pathlib.Path, tmp_path: pathlib.Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old = _copy(clean, tmp_path / "old")
    m = json.loads((old / mf.MANIFEST_FILE).read_text())
    del m["checksums"]
    (old / mf.MANIFEST_FILE).write_text(json.dumps(m))
    rc, _, err = run_cli(["verify", str(old)], capsys)
    assert rc == 2 and "no checksums recorded" in err and "klotski convert" in err
    assert klotski_jax.load(old).config == CheckpointReader(clean).config
    m["checksums"] = {"algorithm": "xxh3_64", "files": {"../x": {"size": 1, "xxh3_64": "0"}}}
    (old / mf.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="invalid checksums section"):
        CheckpointReader(old)
