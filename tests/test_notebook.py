"""The walkthrough notebook (experiments/notebooks/) runs top to bottom in a fresh kernel on
its tiny default model, and its committed .ipynb is the .py's twin, executed, with plots."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
PY = NOTEBOOKS / "lora_walkthrough.py"
IPYNB = NOTEBOOKS / "lora_walkthrough.ipynb"
REGENERATE = "python experiments/notebooks/execute.py"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _images(nb) -> list[dict]:
    return [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


def test_ipynb_is_the_executed_py():
    import jupytext

    py, ipynb = jupytext.read(PY), jupytext.read(IPYNB)
    assert py.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert _cells(ipynb) == _cells(py), f"the .ipynb is stale; regenerate it: {REGENERATE}"
    # executed top to bottom in one kernel, without errors, with its two figures inline
    counts = [c.execution_count for c in ipynb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), REGENERATE
    assert not [o for o in _outputs(ipynb) if o["output_type"] == "error"]
    assert len(_images(ipynb)) == 2


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(PY)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temp dirs: model, exports
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    text = "".join(o.get("text", "") for o in _outputs(nb) if o["output_type"] == "stream")
    assert "compiled 1x" in text and "jlora adapted vs peft" in text
    assert len(_images(nb)) == 2
