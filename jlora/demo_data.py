"""The code-search task of ``make demo``: match a docstring summary to its function.

Pairs come from the Python standard library's own sources, read with :mod:`ast` (nothing is
imported): for every public function and method with a docstring, the query is the
docstring's first paragraph and the document is ``module.Class.name(arguments)``. The split
is by top-level package (``email.utils`` and ``email.message`` land on the same side), so no
module's functions are on both sides of it.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Folders of the standard library that are tests, GUI, packaging or installer code.
_SKIP = frozenset({"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                   "venv", "site-packages", "dist-packages", "pydoc_data", "__pycache__"})
MIN_SUMMARY = 20
MAX_CHARS = 200


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p in _SKIP or p.startswith(("_", ".")) or "-" in p for p in parts):
            continue
        yield ".".join(parts), file


def _functions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if not node.name.startswith("_"):
                yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef) and not prefix and not node.name.startswith("_"):
            yield from _functions(node.body, node.name + ".")


def stdlib_pairs(root: str | Path | None = None) -> list[dict[str, str]]:
    """``{query, document, package}`` records, one per documented public function, in a
    fixed order (each docstring summary once)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for module, file in _modules(root):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for name, node in _functions(tree.body):
            doc = ast.get_docstring(node) or ""
            summary = " ".join(doc.strip().split("\n\n")[0].split())
            if len(summary) < MIN_SUMMARY or summary in seen:
                continue
            seen.add(summary)
            out.append({"query": summary[:MAX_CHARS],
                        "document": f"{module}.{name}({ast.unparse(node.args)})"[:MAX_CHARS],
                        "package": module.split(".")[0]})
    return out


def split_by_package(pairs: list[dict[str, str]], held_out: float = 0.15,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: whole packages go to the test side, in a seeded random order,
    until it holds ``held_out`` of the pairs. Each side keeps the pairs' order shuffled."""
    packages = sorted({p["package"] for p in pairs})
    rng = np.random.default_rng(seed)
    rng.shuffle(packages)
    counts = {k: 0 for k in packages}
    for p in pairs:
        counts[p["package"]] += 1
    test_packages, n = set(), 0
    for k in packages:
        if n >= held_out * len(pairs):
            break
        test_packages.add(k)
        n += counts[k]
    train = [p for p in pairs if p["package"] not in test_packages]
    test = [p for p in pairs if p["package"] in test_packages]
    for side in (train, test):
        order = rng.permutation(len(side))
        side[:] = [side[i] for i in order]
    return train, test


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
