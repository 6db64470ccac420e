"""examples/sglang.ipynb executes (its CPU part) with the SGLang environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "sglang.ipynb"


def test_sglang_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    stubs = str(Path(__file__).resolve().parent / "stubs")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [stubs, os.environ.get("PYTHONPATH", "")] if p))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bit-identical = True, max |diff| = 0.0" in outputs
    assert "loaded into the pool: 0" not in outputs
