"""Writes each notebook's .ipynb from its jupytext .py, executed top to bottom with outputs.

    .venv/bin/python experiments/notebooks/execute.py [NAME.py ...]   # default: all here

Edit the .py (it diffs well), then run this: the .ipynb is regenerated from the .py in a
fresh kernel (``python3``) whose working and temporary directories are a scratch directory,
removed afterwards. tests/test_notebook.py checks that the two agree.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(py: Path) -> Path:
    nb = jupytext.read(py)
    with tempfile.TemporaryDirectory(prefix="jlora-nb-") as scratch:
        old = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = scratch  # inherited by the kernel
        try:
            NotebookClient(nb, kernel_name="python3", timeout=600,
                           resources={"metadata": {"path": scratch}}).execute()
        finally:
            if old is None:
                os.environ.pop("TMPDIR")
            else:
                os.environ["TMPDIR"] = old
    out = py.with_suffix(".ipynb")
    jupytext.write(nb, out)
    return out


def main(argv: list[str]) -> None:
    files = [Path(a).resolve() for a in argv] or sorted(
        p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    for py in files:
        start = time.perf_counter()
        out = execute(py)
        print(f"{out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}: "
              f"executed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
