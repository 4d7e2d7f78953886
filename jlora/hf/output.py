"""Crash-safe output directories for jlora's savers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jlora.errors import HFError


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes ``path`` only if the block succeeds.

    The temporary directory sits beside ``path`` (same filesystem), so the final step is a
    rename: an interrupted or failed write leaves ``path`` as it was (absent, or the previous
    version) and removes the temporary directory. An existing ``path`` directory is replaced.

    Example:
      >>> import pathlib, tempfile
      >>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
      >>> with atomic_dir(target) as tmp:
      ...     _ = (tmp / "config.json").write_text("{}")
      >>> sorted(p.name for p in target.iterdir())
      ['config.json']
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise HFError(f"{str(path)!r} exists and is not a directory; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_dir"]
