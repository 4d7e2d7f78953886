"""Guarded, crash-safe output directories for :func:`jlora.hf.save_peft` and ``save_merged``.

A save never destroys what jlora did not write, and a crash at any instant (SIGKILL
included) leaves the previous output or the new one at the target, or a state that the next
save or load to the same place completes into the new one.

**Guard.** :func:`check_target` runs before a saver does any work and raises an
:class:`~jlora.errors.OutputPathError` naming the path, the reason and the fix, with nothing
touched, for a target that is

* always: a file, the filesystem root, or a base model's directory: the
  ``base_model_name_or_path`` an adapter is saved against, or any directory holding a
  transformers checkpoint that ``save_merged`` did not write (config.json beside weights
  without jlora's mark in their safetensors metadata);
* unless ``overwrite=True``: the current directory or a parent of it, a directory
  :func:`jlora.hf.load` read in this process (while it holds a checkpoint: jlora's own
  export, used as a base model), or an existing directory that is neither empty nor an
  output of the same kind (for ``save_peft`` a PEFT adapter directory, one holding
  adapter_config.json, whoever wrote it; for ``save_merged`` a directory it wrote).

Even then only the files of the saver's :class:`OutputKind` are replaced or removed:
adapter_config.json and adapter_model.safetensors; config.json, model.safetensors,
model-*-of-*.safetensors and model.safetensors.index.json. The kind's files that the new
output lacks (shards of an earlier save, a stale index) are removed, so no reader mixes two
outputs; every other file in the directory stays as it is.

**Protocol**, for a target ``T`` in the directory ``P``:

1. Stage: the saver writes every file into a fresh ``P/.T.tmp-<hex>``, which holds an
   ``flock`` while its process lives; then files and directory are fsynced.
2. Commit, under an ``flock`` on ``P``: a ``T`` that does not exist is created by renaming
   the stage to it (atomic; done). Otherwise a journal (the files to install, the stale
   files to remove) is written into the stage and fsynced, and the stage is renamed to
   ``P/.T.jlora-commit``, then ``P`` is fsynced: that rename is the commit point.
3. Apply: unlink ``T``'s key file (adapter_config.json or config.json, so that until the end
   of this step no reader takes ``T`` for a whole output), unlink the stale files, move the
   new files in with ``os.replace`` (the key file last), fsync ``T``, delete the journal and
   the commit directory. Each step can be re-run from any instant with the same result.

**Recovery.** :func:`settle` re-runs the apply of a committed save when
``P/.T.jlora-commit`` exists (one ``stat`` when it does not): every save, and every
:func:`jlora.hf.load` and :func:`jlora.hf.load_peft`, calls it first. A save then deletes the
stages ``P/.T.tmp-*`` that no live save holds (uncommitted, so never needed) and the
``P/.T.old-*`` directories of jlora versions before this protocol (whose good copy it moves
back to ``T`` first if ``T`` is absent).

Example:
  >>> import pathlib, tempfile
  >>> target = pathlib.Path(tempfile.mkdtemp()) / "adapter"
  >>> with write_output(target, PEFT_ADAPTER) as stage:
  ...     _ = (stage / "adapter_config.json").write_text("{}")
  ...     _ = (stage / "adapter_model.safetensors").write_bytes(b"")
  >>> _ = (target / "notes.txt").write_text("mine")
  >>> with write_output(target, PEFT_ADAPTER) as stage:
  ...     _ = (stage / "adapter_config.json").write_text('{"r": 8}')
  ...     _ = (stage / "adapter_model.safetensors").write_bytes(b"")
  >>> sorted(p.name for p in target.iterdir())
  ['adapter_config.json', 'adapter_model.safetensors', 'notes.txt']
  >>> sorted(p.name for p in target.parent.iterdir())
  ['adapter']
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from jlora.errors import OutputPathError
from jlora.hf.io import INDEX_FILE, SINGLE_FILE
from jlora.hf.peft_layout import CONFIG_FILE, WEIGHTS_FILE

try:
    import fcntl
except ImportError:  # not POSIX: saves still work, without locks between processes
    fcntl = None

JOURNAL = ".jlora-journal.json"
# save_merged's safetensors metadata, beside transformers' {"format": "pt"}: the mark that
# tells a directory save_merged wrote (re-saved without overwrite=True) from a base model.
MERGED_METADATA = {"format": "pt", "jlora": "save_merged"}
_HF_CONFIG = "config.json"
# Weight files of a transformers checkpoint, safetensors or not, single or sharded.
_HF_WEIGHTS = re.compile(
    r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
    r"(\.index\.json)?"
)
_SOURCES: set[str] = set()  # directories jlora.hf.load read in this process


@dataclass(frozen=True)
class OutputKind:
    """What one saver writes into its target directory.

    Attributes:
      name: the output, for messages (``"PEFT adapter"``).
      saver: the function that writes it (``"save_peft"``), for messages and journals.
      key: the file readers need first: removed first and installed last in a swap.
      files: full-match pattern of every file name the saver writes; only these are ever
        replaced or removed in a target directory.
      is_output: whether an existing directory holds an output of this kind, which a save
        may replace without ``overwrite=True``.
      suggestion: a subdirectory name to suggest in messages.
      listing: the files it writes, for messages.
    """

    name: str
    saver: str
    key: str
    files: re.Pattern
    is_output: Callable[[Path], bool]
    suggestion: str
    listing: str

    def owns(self, name: str) -> bool:
        """Whether ``name`` is one of the file names this kind writes."""
        return self.files.fullmatch(name) is not None


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="np") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return {}


def _checkpoint_weights(directory: Path) -> list[str]:
    """The weight files of a transformers checkpoint in ``directory`` ([] if it holds none)."""
    names = _names(directory)
    if _HF_CONFIG not in names:
        return []
    return [n for n in names if _HF_WEIGHTS.fullmatch(n) and (directory / n).is_file()]


def _merged_mark(directory: Path, weights: list[str]) -> bool:
    """Every weight file is safetensors that save_merged marked as its own."""
    files = [n for n in weights if not n.endswith(".index.json")]
    return bool(files) and all(
        n.endswith(".safetensors") and _metadata(directory / n).get("jlora") == "save_merged"
        for n in files
    )


def _written_by_save_merged(directory: Path) -> bool:
    weights = _checkpoint_weights(directory)
    return _merged_mark(directory, weights)


def _foreign_checkpoint(directory: Path) -> list[str]:
    """The weights of a transformers checkpoint in ``directory`` that jlora did not write."""
    weights = _checkpoint_weights(directory)
    return [] if not weights or _merged_mark(directory, weights) else weights


def _peft_dir(d: Path) -> bool:
    """A PEFT adapter directory: it holds the default adapter's config, or only named
    adapters' subfolders (PEFT's layout: ``<dir>/<name>/adapter_config.json``)."""
    if (d / CONFIG_FILE).is_file():
        return True
    names = _names(d)
    return bool(names) and all((d / n / CONFIG_FILE).is_file() for n in names)


PEFT_ADAPTER = OutputKind(
    name="PEFT adapter",
    saver="save_peft",
    key=CONFIG_FILE,
    files=re.compile("|".join(map(re.escape, (CONFIG_FILE, WEIGHTS_FILE)))),
    is_output=lambda d: _peft_dir(d),
    suggestion="adapter",
    listing=f"{CONFIG_FILE} and {WEIGHTS_FILE}",
)
MERGED_MODEL = OutputKind(
    name="merged model",
    saver="save_merged",
    key=_HF_CONFIG,
    files=re.compile(
        "|".join(map(re.escape, (_HF_CONFIG, SINGLE_FILE, INDEX_FILE)))
        + r"|model-\d+-of-\d+\.safetensors"
    ),
    is_output=_written_by_save_merged,
    suggestion="merged",
    listing=f"{_HF_CONFIG}, {SINGLE_FILE} or model-*-of-*.safetensors with {INDEX_FILE}",
)
_KINDS = {k.saver: k for k in (PEFT_ADAPTER, MERGED_MODEL)}


def resolve(path: Any, saver: str) -> Path:
    """The absolute, symlink-free target of ``path`` (``""`` is the current directory).

    Raises:
      OutputPathError: ``path`` is not a ``str`` or ``os.PathLike`` of a string, or holds NUL.
    """
    raw = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(raw, str) or "\0" in raw:
        raise OutputPathError(
            f"{saver}: path must be a str or os.PathLike naming a directory, got "
            f"{type(path).__name__} {path!r}"
        )
    return Path(os.path.realpath(raw or "."))


def _same(a: Path, b: Any) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _refusal(target: Path, kind: OutputKind, overwrite: bool, base: Any) -> str | None:
    """Why ``kind`` may not be written to ``target`` (None if it may). Reads only."""
    here = f"{kind.saver}: refusing to write to {str(target)!r}"
    sibling = target.parent / f"{target.name}-{kind.suggestion}"
    elsewhere = f"choose another directory, e.g. {str(sibling)!r}"
    if target.parent == target:
        return f"{here}: it is the filesystem root; {elsewhere}"
    if target.exists() and not target.is_dir():
        return f"{here}: it exists and is not a directory; {elsewhere}"
    never = (
        "jlora never writes into a base model, not even with overwrite=True: "
        f"{elsewhere} (or delete that directory yourself if you mean to replace it)"
    )
    if base is not None and target.exists() and _same(target, base):
        what = f"the base model's directory (base_model_name_or_path={base!r})"
        return f"{here}: it is {what}; {never}"
    foreign = _foreign_checkpoint(target)
    if foreign:
        return (
            f"{here}: it holds a transformers checkpoint (config.json, {', '.join(foreign)}) "
            f"that jlora's save_merged did not write; {never}"
        )
    for name in _names(target):
        if kind.owns(name) and (target / name).is_dir() and not (target / name).is_symlink():
            what = f"{name!r} in it is a directory, where the save writes a file"
            return f"{here}: {what}; {elsewhere}"
    if overwrite:
        return None
    or_overwrite = (
        f"or pass overwrite=True to write the {kind.name}'s files ({kind.listing}) there: "
        "those are the only files a save replaces or removes, every other file stays"
    )
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        where = "" if target == cwd else f" {str(cwd)!r}"
        what = "the current directory" if target == cwd else "a parent of the current directory"
        inside = f"choose a new directory, e.g. {str(target / kind.suggestion)!r}"
        return f"{here}: it is {what}{where}; {inside}, {or_overwrite}"
    if str(target) in _SOURCES and _checkpoint_weights(target):
        return (
            f"{here}: jlora.hf.load read the model in it in this process (a base model?); "
            f"{elsewhere}, or pass overwrite=True if you mean to replace that model"
        )
    names = _names(target)
    if names and not kind.is_output(target):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (
            f"{here}: it already holds files ({shown}) and is not a {kind.name} directory "
            f"that {kind.saver} may replace; {elsewhere}, {or_overwrite}"
        )
    return None


def check_target(path: Any, kind: OutputKind, *, overwrite: bool = False, base: Any = None) -> Path:
    """Checks that ``kind`` may be saved to ``path``; returns the resolved target.

    First completes a committed save to ``path`` that a crash interrupted (:func:`settle`);
    otherwise reads only. See the module docstring for the rules.

    Args:
      path: the target directory (``str`` or ``os.PathLike``).
      kind: :data:`PEFT_ADAPTER` or :data:`MERGED_MODEL`.
      overwrite: allow the current directory or a parent of it, and a directory holding
        other files; the kind's files there are replaced and the others kept.
      base: a base model's directory (or hub name) that must not be the target.

    Raises:
      OutputPathError: the target is refused (the message says why and what to do).
    """
    if not isinstance(overwrite, bool):
        raise OutputPathError(f"{kind.saver}: overwrite must be True or False, got {overwrite!r}")
    target = resolve(path, kind.saver)
    settle(target)
    reason = _refusal(target, kind, overwrite, base)
    if reason is not None:
        raise OutputPathError(reason)
    return target


def note_source(path: str | os.PathLike) -> None:
    """Records that :func:`jlora.hf.load` reads ``path``: no save may write there.

    Completes an interrupted save to ``path`` first (:func:`settle`).
    """
    target = Path(os.path.realpath(os.fspath(path)))
    settle(target)
    _SOURCES.add(str(target))


def _commit_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.jlora-commit"


def _lock(directory: Path, blocking: bool = True) -> int | None:
    """An open descriptor of ``directory`` holding its exclusive flock (None without fcntl).

    Raises:
      BlockingIOError: ``blocking`` is False and another descriptor holds the lock.
    """
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` (saves and recoveries of its children in turn)."""
    fd = _lock(directory)
    try:
        yield
    finally:
        _unlock(fd)


def _busy(directory: str) -> bool:
    """Whether a live save holds ``directory`` (its stage) locked."""
    try:
        _unlock(_lock(Path(directory), blocking=False))
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows opens no directory
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def settle(path: str | os.PathLike) -> None:
    """Completes a save to ``path`` that was interrupted after its commit point.

    Cheap when there is none (one ``stat``); loads call it before reading.

    Raises:
      OutputPathError: the commit's journal is unreadable (the message says what to check).
    """
    target = Path(os.path.realpath(os.fspath(path)))
    if target.parent == target or not os.path.lexists(_commit_dir(target)):
        return
    with _locked(target.parent):
        _roll_forward(target)


def _roll_forward(target: Path) -> None:
    """Re-runs the apply of a committed save to ``target``; the caller holds the lock."""
    commit = _commit_dir(target)
    if not commit.is_dir():
        return
    try:
        journal = json.loads((commit / JOURNAL).read_text())
        kind = _KINDS[journal["kind"]]
        install, remove = list(journal["install"]), list(journal["remove"])
        if not all(isinstance(n, str) and kind.owns(n) for n in install + remove):
            raise ValueError("it names files the save does not write")
    except FileNotFoundError:  # the apply had finished; only the empty directory was left
        shutil.rmtree(commit, ignore_errors=True)
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputPathError(
            f"{str(commit)!r} records an interrupted save to {str(target)!r}, but its journal "
            f"is unreadable ({e}); check {str(target)!r}, then delete {str(commit)!r}"
        ) from None
    _apply(commit, target, kind, install, remove)


def _apply(commit: Path, target: Path, kind: OutputKind, install: list, remove: list) -> None:
    """Moves a committed output into ``target``; idempotent, so it can resume anywhere."""
    target.mkdir(exist_ok=True)
    if (commit / kind.key).exists():  # not installed yet: the old key goes first
        _unlink(target / kind.key)
    for name in remove:
        _unlink(target / name)
    for name in sorted(install, key=lambda n: n == kind.key):  # the key file last
        if os.path.lexists(commit / name):
            os.replace(commit / name, target / name)
    _fsync(target)
    _unlink(commit / JOURNAL)
    with contextlib.suppress(OSError):
        os.rmdir(commit)
    _fsync(target.parent)


def _clean_debris(target: Path) -> None:
    """Deletes what interrupted saves to ``target`` left beside it; the caller holds the lock."""
    stages, olds = f".{target.name}.tmp-", f".{target.name}.old-"
    for entry in os.scandir(target.parent):
        if not entry.name.startswith((stages, olds)) or not entry.is_dir(follow_symlinks=False):
            continue
        if _busy(entry.path):
            continue
        previous = Path(entry.path) / target.name  # an earlier jlora's atomic_dir kept it here
        if entry.name.startswith(olds) and not target.exists() and previous.is_dir():
            os.rename(previous, target)
        shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def write_output(
    path: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False, base: Any = None
) -> Iterator[Path]:
    """Yields an empty staging directory whose files become ``kind``'s files at ``path``.

    Runs :func:`check_target`, cleans what interrupted saves to ``path`` left, and, when the
    block succeeds, swaps the staged files in as the module docstring describes. If the block
    raises, the stage is deleted and ``path`` is as it was.

    Raises:
      OutputPathError: the target is refused, or its parent cannot be created.
    """
    target = check_target(path, kind, overwrite=overwrite, base=base)
    parent = target.parent
    stage = parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with _locked(parent):
            _clean_debris(target)
            stage.mkdir()
            stage_lock = _lock(stage)  # held while this save lives: no debris (_busy)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputPathError(
            f"{kind.saver}: cannot write beside {str(target)!r} ({e}); choose a directory "
            "whose parent you can write to"
        ) from None
    committed = False
    try:
        yield stage
        names = _names(stage)
        if kind.key not in names or not all(kind.owns(n) for n in names):
            raise OutputPathError(f"{kind.saver} staged {names}, not {kind.name} files (a bug)")
        for name in names:
            _fsync(stage / name)
        _fsync(stage)
        with _locked(parent):
            _roll_forward(target)
            reason = _refusal(target, kind, overwrite, base)  # it may have changed meanwhile
            if reason is not None:
                raise OutputPathError(reason)
            if not target.exists():
                os.rename(stage, target)
                committed = True
                _fsync(parent)
                return
            remove = [n for n in _names(target) if kind.owns(n) and n not in names]
            journal = {"kind": kind.saver, "install": names, "remove": remove}
            with open(stage / JOURNAL, "w") as f:
                json.dump(journal, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync(stage)
            commit = _commit_dir(target)
            os.rename(stage, commit)
            committed = True
            _fsync(parent)
            _apply(commit, target, kind, names, remove)
    finally:
        _unlock(stage_lock)
        if not committed:
            shutil.rmtree(stage, ignore_errors=True)


__all__ = [
    "MERGED_METADATA",
    "MERGED_MODEL",
    "PEFT_ADAPTER",
    "OutputKind",
    "check_target",
    "note_source",
    "resolve",
    "settle",
    "write_output",
]
