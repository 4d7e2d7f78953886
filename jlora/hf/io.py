"""safetensors reading and writing, tensor by tensor, and atomic directory writes.

Reading parses the safetensors header itself (8-byte little-endian length, JSON, raw
little-endian data) so that every dtype numpy knows through ``ml_dtypes`` (bfloat16, float8)
loads, a truncated file is reported with its name before any data is read, and one tensor at
a time is in host memory. Writing takes :class:`LazyTensor` entries whose data is produced
only when its bytes are written, so an export never holds two full copies of the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jlora.errors import HFError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the file."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class LazyTensor(NamedTuple):
    """A tensor to write whose data ``load()`` produces only when it is written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], Any]


def parse_size(size: int | str) -> int:
    """Bytes in a size like ``"5GB"`` (10**9), ``"500MiB"`` (2**20) or an int.

    Example:
      >>> parse_size("5GB"), parse_size("1KiB"), parse_size(10)
      (5000000000, 1024, 10)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if isinstance(size, bool) or match is None:
        raise HFError(f"max_shard_size {size!r} is not a size: use an int or e.g. '5GB', '500MiB'")
    number = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if number < 1:
        raise HFError(f"max_shard_size {size!r} must be at least 1 byte")
    return int(number)


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors one safetensors file holds, from its header; checks the file is whole.

    Raises:
      HFError: the file is truncated or its header is corrupt (the message names the file).
    """
    file = Path(file)
    size = file.stat().st_size
    bad = f"safetensors file {str(file)!r} is truncated or corrupt"
    fix = "the download or the write was probably interrupted: fetch or export it again"
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HFError(f"{bad}: {size} bytes, too short for a header; {fix}")
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            raise HFError(f"{bad}: the header needs {8 + n} bytes, the file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HFError(f"{bad}: its JSON header does not parse ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise HFError(f"{bad}: its header is not a JSON object; {fix}")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            msg = f"{bad}: tensor {name!r} has an unreadable header entry {entry!r}"
            raise HFError(msg) from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise HFError(f"{bad}: tensor {name!r} has {end - start} bytes for shape {shape}")
        if 8 + n + end > size:
            raise HFError(
                f"{bad}: tensor {name!r} ends at byte {8 + n + end}, the file has {size}; {fix}"
            )
        out[name] = TensorInfo(name, file, dtype, shape, 8 + n + start, 8 + n + end)
    return out


def checkpoint_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a HF model directory (``model.safetensors`` or sharded with an index).

    Raises:
      HFError: no weights, a shard the index names is absent, or a file is truncated.
    """
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFError(f"{str(path / INDEX_FILE)!r} is not a safetensors index ({e})") from None
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise HFError(f"{str(path / INDEX_FILE)!r} names shard {shard!r}, which is absent")
            infos = read_header(path / shard)
            for name, file in weight_map.items():
                if file == shard and name not in infos:
                    raise HFError(f"the index puts tensor {name!r} in {shard!r}, which lacks it")
            out.update(infos)
        return out
    if (path / SINGLE_FILE).is_file():
        return read_header(path / SINGLE_FILE)
    raise HFError(
        f"{str(path)!r} holds no safetensors weights: expected {SINGLE_FILE} or {INDEX_FILE} "
        "with its shards (PyTorch .bin checkpoints are not read: re-save with "
        "save_pretrained(..., safe_serialization=True))"
    )


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The data of one tensor as a numpy array (its own copy, not a view of the file)."""
    data = np.fromfile(info.file, dtype=np.uint8, count=info.end - info.start, offset=info.start)
    if data.size != info.end - info.start:
        raise HFError(f"safetensors file {str(info.file)!r} is truncated at tensor {info.name!r}")
    return data.view(info.dtype.newbyteorder("<")).reshape(info.shape)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` for each tensor of a HF model directory, one at a time."""
    for name, info in checkpoint_index(path).items():
        yield name, read_tensor(info)


def write_safetensors(
    file: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Writes one safetensors file; returns its data size in bytes.

    Args:
      file: the file to create.
      tensors: name -> array (numpy, jax) or :class:`LazyTensor`, written in this order.
      metadata: string metadata; defaults to ``{"format": "pt"}`` (what transformers wants).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        dtype = np.dtype(t.dtype)
        if dtype not in _CODES:
            raise HFError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(t.shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t in tensors.items():
            array = np.asarray(t.load() if isinstance(t, LazyTensor) else t)
            want = header[name]
            if list(array.shape) != want["shape"] or _CODES.get(array.dtype) != want["dtype"]:
                raise HFError(
                    f"tensor {name!r} produced {array.dtype}{list(array.shape)}, "
                    f"declared {want['dtype']}{want['shape']}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            del array
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_weights(
    directory: str | os.PathLike,
    tensors: Mapping[str, Any],
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes a model's weights into ``directory`` as transformers does; returns the files.

    One ``model.safetensors`` when the data fits in ``max_shard_size``, else shards
    ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``. A tensor
    larger than the limit gets a shard of its own.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, Any]] = [{}]
    size = total = 0
    for name, t in tensors.items():
        nbytes = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    directory = Path(directory)
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        write_safetensors(directory / file, shard, metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*files, INDEX_FILE]


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


def hf_layout_shape(fn: Callable, *args: Any, shape: Sequence[int], dtype: Any) -> Any:
    """Calls a name-map function on a zero-memory placeholder of ``shape`` (shapes only)."""
    return fn(*args, np.broadcast_to(np.zeros((), dtype), tuple(shape)))


__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "LazyTensor",
    "TensorInfo",
    "atomic_dir",
    "checkpoint_index",
    "hf_layout_shape",
    "iter_tensors",
    "parse_size",
    "read_header",
    "read_tensor",
    "write_safetensors",
    "write_weights",
]
