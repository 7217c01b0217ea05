"""notebooks/quickstart.ipynb is executed end to end, so it never goes stale."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook works in a tempfile.mkdtemp() folder
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # the cells printed what they claim: both pipeline calls, the store, the plane table and a figure
    assert "second call ran: [] skipped: ['data', 'train', 'capture', 'estimate']" in text
    assert "layers: ['hidden1', 'hidden2', 'hidden3', 'hidden4', 'hidden5', 'output']" in text
    assert "hidden5 activations: (4096, 3) float32" in text
    assert "info-plane" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0]["data"]["image/png"]) > 1000
    assert list(tmp_path.glob("ibscope-quickstart-*/tanh/results.csv"))
