"""The dense part of a converted checkpoint is one orbax checkpoint (format_version 2).

A user restores `OUT_DIR/dense` with `orbax.checkpoint.StandardCheckpointer` (plainly, or into
ShapeDtypeStructs with a single-device or 1-device-mesh sharding) and gets the HF tensors under
the flat names split on "."; the runtime still reads one array at a time through TensorStore;
version 1 checkpoints (plain zarr3 dense arrays, no orbax metadata) are still read; a failure
inside the orbax save leaves nothing behind.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import hf_models
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints import store
from klotski_jax.checkpoints.convert import convert
from klotski_jax.checkpoints.errors import ManifestError
from klotski_jax.checkpoints.safetensors_io import SafetensorsCheckpoint
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import ModelConfig
from klotski_jax.models.families import TensorSource, hf_sources
from klotski_jax.models.specs import Kind, flatten, weight_specs

# One family per naming quirk: Qwen2-MoE (biases, shared expert, a dense MLP layer), Qwen3-MoE
# (per-head q/k norms), Mixtral (block_sparse_moe router), OLMoE (full q/k norms).
FAMILIES = ["qwen2_moe-sparse-step", "qwen3_moe", "mixtral", "olmoe"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[pathlib.Path, dict[str, np.ndarray]]]:
    """name -> (converted checkpoint, the HF model's dense tensors by flat name)."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for name in FAMILIES:
        model = hf_models.make_hf_model(name)
        model.save_pretrained(root / f"{name}-hf")
        ckpt = convert(root / f"{name}-hf", root / name, progress=False)
        cfg = CheckpointReader(ckpt).config
        sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        want = {}
        for spec in weight_specs(cfg):
            src = hf_sources(cfg)[spec.name]
            if isinstance(src, TensorSource):
                want[spec.name] = sd[next(k for k in src.keys if k in sd)]
        out[name] = (ckpt, want)
    return out


def _assert_tree_equals(tree, want: dict[str, np.ndarray], array_type: type) -> None:
    assert isinstance(tree["layers"], dict) and sorted(tree["layers"], key=int) == [
        str(i) for i in range(len(tree["layers"]))]
    got = flatten(tree)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert isinstance(g, array_type), (name, type(g))
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.asarray(g).tobytes() == np.ascontiguousarray(w).tobytes(), name


@pytest.mark.parametrize("name", FAMILIES)
def test_standard_checkpointer_restores_the_hf_tensors(converted, name: str) -> None:
    ckpt, want = converted[name]
    restored = ocp.StandardCheckpointer().restore(ckpt / "dense")
    _assert_tree_equals(restored, want, np.ndarray)
    assert restored["layers"]["0"]["attn"]["q"].shape == want["layers.0.attn.q"].shape


def _target(path: pathlib.Path, sharding: jax.sharding.Sharding):
    """As in docs/format.md: ShapeDtypeStructs from orbax's own metadata."""
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)


@pytest.mark.parametrize("kind", ["single-device", "mesh"])
def test_restore_into_a_sharding_target(converted, kind: str) -> None:
    ckpt, want = converted["qwen2_moe-sparse-step"]
    if kind == "single-device":
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    restored = ocp.StandardCheckpointer().restore(ckpt / "dense", _target(ckpt / "dense", sharding))
    _assert_tree_equals(restored, want, jax.Array)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == sharding


def test_layout_and_manifest(converted) -> None:
    ckpt, want = converted["mixtral"]
    m = json.loads((ckpt / mf.MANIFEST_FILE).read_text())
    assert m["format_version"] == 2
    assert m["dense"] == {"format": "orbax-checkpoint", "path": "dense", "ocdbt": False,
                          "zarr3": True, "compression": False,
                          "orbax_version": ocp.__version__}
    assert m["experts"]["path"] == "experts"
    dense = {n: e for n, e in m["tensors"].items() if e["kind"] == "dense"}
    assert set(dense) == set(want)
    for name, entry in dense.items():
        assert entry["path"] == f"dense/{name}"
        assert entry["shape"] == list(want[name].shape) and entry["dtype"] == "float32"
        assert (ckpt / entry["path"] / "zarr.json").is_file()  # one TensorStore array per leaf
    # Only orbax's files and the arrays: no OCDBT database, nothing left from the temporary dir.
    assert {p.name for p in (ckpt / "dense").iterdir()} - set(dense) <= {
        "_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt", "_sharding"}
    assert not (ckpt / "dense" / "manifest.ocdbt").exists()


def test_one_array_is_read_without_the_others(converted) -> None:
    """The runtime's per-layer read opens only that layer's arrays (never the whole checkpoint):
    with every other dense array deleted, layer 1 still reads."""
    src, want = converted["olmoe"]
    ckpt = src.parent / "olmoe-layer1-only"
    shutil.copytree(src, ckpt)
    keep = {n for n in want if n.startswith("layers.1.")}
    for name in set(want) - keep:
        shutil.rmtree(ckpt / "dense" / name)
    reader = CheckpointReader(ckpt)
    for name in keep:
        np.testing.assert_array_equal(reader.dense(name), want[name])


def v1_name(name: str) -> str:
    """The version 1 name of an array: the MoE block's arrays sat directly on the layer."""
    return (name.replace(".moe.router.weight", ".router").replace(".moe.shared.", ".shared.")
            .replace(".moe.experts.", ".experts."))


def test_version_1_checkpoints_are_still_read(converted, tmp_path) -> None:
    """A v1 checkpoint, as the v1 writer made it: dense/<name>/ plain zarr3 arrays (one chunk,
    bytes codec) under the v1 names (`layers.i.router`, `layers.i.experts.up`) and no orbax
    files; manifest without the dense/experts sections. It reads under the v2 names."""
    src, want = converted["qwen3_moe"]
    ckpt = tmp_path / "v1"
    shutil.copytree(src, ckpt)
    shutil.rmtree(ckpt / "dense")
    writer = store.StoreWriter(ckpt)
    v1 = {name: v1_name(name) for name in want}  # v1 named the MoE block's arrays flat
    for name, value in want.items():
        writer.write(writer.create(f"dense/{v1[name]}", value.shape, "float32", Kind.DENSE), value)
    writer.flush()
    assert (ckpt / "dense" / "embed" / "c" / "0" / "0").read_bytes() == want["embed"].tobytes()
    m = json.loads((ckpt / mf.MANIFEST_FILE).read_text())
    del m["dense"], m["experts"]
    m["format_version"] = 1
    tensors = {}
    for name, entry in m["tensors"].items():
        old = v1_name(name)
        if entry["kind"] == "expert":
            (ckpt / entry["path"]).rename(ckpt / "experts" / old)
            entry = {**entry, "path": f"experts/{old}"}
        else:
            entry = {**entry, "path": f"dense/{old}"}
        tensors[old] = entry
    assert "layers.1.router" in tensors and "layers.1.experts.up" in tensors
    m["tensors"] = tensors
    (ckpt / mf.MANIFEST_FILE).write_text(json.dumps(m))
    reader = CheckpointReader(ckpt)
    assert reader.manifest["format_version"] == 1
    got = reader.all_dense()
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w)
    moe = reader.config.moe_layers.index(True)
    np.testing.assert_array_equal(reader.experts(moe)["up"], CheckpointReader(src).experts(moe)["up"])


def test_v2_manifest_sections_are_checked(converted, tmp_path) -> None:
    src, _ = converted["mixtral"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    path = ckpt / mf.MANIFEST_FILE
    good = json.loads(path.read_text())
    bad_path = json.loads(json.dumps(good))
    bad_path["tensors"]["embed"]["path"] = "elsewhere/embed"
    for m, match in (({**good, "dense": {**good["dense"], "ocdbt": True}}, "'dense' section"),
                     ({k: v for k, v in good.items() if k != "dense"}, "'dense' section"),
                     ({**good, "experts": {}}, "'experts' section"),
                     (bad_path, "invalid path")):
        path.write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=match):
            CheckpointReader(ckpt)


def test_failure_inside_the_orbax_save_leaves_nothing(converted, tmp_path, monkeypatch) -> None:
    src = converted["olmoe"][0].parent / "olmoe-hf"
    cfg = ModelConfig.from_hf_config(json.loads((src / "config.json").read_text()))
    dense_keys = {s.key for s in hf_sources(cfg).values() if isinstance(s, TensorSource)}
    original, reads = SafetensorsCheckpoint.read, []

    def failing_read(self, key, **kw):
        if key in dense_keys:
            reads.append(key)
            if len(reads) == 5:
                raise OSError("disk full (simulated)")
        return original(self, key, **kw)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", failing_read)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="simulated"):
        convert(src, out, progress=False)
    assert len(reads) == 5  # it failed inside the dense save, after some arrays were written
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
