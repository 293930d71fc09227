"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), with its small workload.

The notebook is what Colab and Jupyter users start from; executing it here keeps its cells in
step with the API. KLOTSKI_NOTEBOOK_SMALL=1 shrinks the workload to about a minute on 2 cores;
the default model is converted into this test's own cache directory.
"""

from __future__ import annotations

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")  # the notebook's kernel
    monkeypatch.setenv("KLOTSKI_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("KLOTSKI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KLOTSKI_JAX_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "tok/s; device peak" in text and "group(s) x" in text
    assert (tmp_path / "klotski-notebook-out" / "bench.png").stat().st_size > 0
    assert (tmp_path / "klotski-notebook-out" / "generate-trace.json").stat().st_size > 0
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, "the bench plot is shown inline"
