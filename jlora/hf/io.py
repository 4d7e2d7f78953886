"""safetensors through its library, and what the library does not do.

Reading is the ``safetensors`` library's lazy ``safe_open``: opening a file validates its whole
header (known dtypes, integer shapes, byte ranges that tile the data exactly and end at the
end of the file) before any data is read, headers give names, dtypes and shapes without data,
and ``get_tensor`` copies one tensor at a time out of the memory map (bfloat16 as ml_dtypes'
numpy dtype). Every library error becomes an :class:`~jlora.errors.HFError` naming the file.

What stays here, each because the library cannot do it (a test in
``tests/hf/test_safetensors.py`` shows each gap):

* float8 data: the library's numpy framework looks these dtypes up as ``numpy.float8_*``, which
  numpy lacks, so they are read from the byte range the library validated.
* writing: the library's writer takes a pointer to every tensor of a file at once, so it needs
  them all in memory together; :func:`write_safetensors` streams :class:`LazyTensor` entries,
  one in memory at a time.
* sharded checkpoints: the index file (``model.safetensors.index.json``) is validated here, and
  may name only shards inside the model directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes  # also makes np.dtype("bfloat16") known, which the library's reader uses
import numpy as np
from safetensors import SafetensorError, safe_open

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
# safetensors' numpy framework (0.8) fetches these as numpy.float8_e4m3fn etc., which numpy
# lacks: it raises AttributeError (test_library_numpy_framework_cannot_read_float8).
_NOT_BY_LIBRARY = frozenset({_DTYPES["F8_E4M3"], _DTYPES["F8_E5M2"]})
# What the commonest library errors mean, for the message (the library's own words follow).
_HINTS = {
    "header too small": "too short for a header",
    "invalid JSON in header": "its JSON header does not parse or holds a wrong field",
    "invalid offset": "tensor data_offsets that overlap, leave a gap or are out of order",
    "not fully covered": "its size does not match its header (cut short, or bytes appended)",
    "invalid shape, data type, or offset": "a byte range that does not fit its shape and dtype",
}
_FIX = "fetch or export it again (an interrupted download or write leaves such files)"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the file.

    The byte range is derived from the header the library validated (tensors tile the data
    section in offset order up to the end of the file); only float8 reads use it.
    """

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


@contextlib.contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """``safe_open(file)`` for numpy, with the library's errors as HFErrors naming the file."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        said = str(e).removeprefix("Error while deserializing header: ")
        hint = next((h for key, h in _HINTS.items() if key in said), "the library refuses it")
        msg = f"safetensors file {str(file)!r} is truncated or corrupt: {hint} ({said}); {_FIX}"
        raise HFError(msg) from e
    except OSError as e:
        msg = f"safetensors file {str(file)!r} cannot be read ({e}); check the path and its rights"
        raise HFError(msg) from e


def _infos(f: Any, file: Path) -> dict[str, TensorInfo]:
    """The TensorInfos of an opened file, in offset order, from its header alone."""
    found = []
    for name in f.offset_keys():
        view = f.get_slice(name)
        code, shape = view.get_dtype(), tuple(view.get_shape())
        if code not in _DTYPES:
            raise HFError(
                f"safetensors file {str(file)!r}: tensor {name!r} has dtype {code}, which jlora "
                f"does not read (it reads {', '.join(_DTYPES)}); convert it with transformers"
            )
        found.append((name, _DTYPES[code], shape))
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in found]
    start = file.stat().st_size - sum(sizes)  # the library checked the data ends the file
    out = {}
    for (name, dtype, shape), size in zip(found, sizes):
        out[name] = TensorInfo(name, file, dtype, shape, start, start + size)
        start += size
    return out


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors one safetensors file holds, from its header; checks the file is whole.

    Raises:
      HFError: the file is absent, truncated or its header is corrupt (the message names the
        file), or a tensor has a dtype jlora does not read.
    """
    file = Path(file)
    with _opened(file) as f:
        return _infos(f, file)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The data of one tensor as a numpy array (its own copy, not a view of the file).

    Raises:
      HFError: the file is no longer readable, or changed since ``info`` was read.
    """
    changed = HFError(
        f"safetensors file {str(info.file)!r} changed since its header was read (tensor "
        f"{info.name!r}); load it again"
    )
    with _opened(info.file) as f:
        if info.dtype in _NOT_BY_LIBRARY:
            if _infos(f, info.file).get(info.name) != info:
                raise changed
            size = info.end - info.start
            data = np.fromfile(info.file, np.uint8, count=size, offset=info.start)
            if data.size != size:
                raise changed
            return data.view(info.dtype.newbyteorder("<")).reshape(info.shape)
        try:
            array = f.get_tensor(info.name)  # a copy out of the memory map
        except SafetensorError:
            raise changed from None  # the file no longer holds the tensor
    if array.dtype != info.dtype or array.shape != info.shape:
        raise changed
    return array


def _shard(index: Path, root: Path, shard: Any) -> Path:
    """The path of a shard the index names, which must be a file inside the model directory."""
    where = f"safetensors index {str(index)!r}: weight_map names shard {shard!r}"
    fix = "the index must name shard files inside the model directory; fix it or fetch it again"
    if not isinstance(shard, str) or Path(shard).name in ("", ".", ".."):
        raise HFError(f"{where}, which is not a file name; {fix}")
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise HFError(f"{where}, which is outside the model directory {str(root)!r}; {fix}")
    path = index.parent / shard
    if not path.is_file():
        raise HFError(f"{where}, which is absent; fetch the missing shard, or export again")
    real = path.resolve()
    # The Hugging Face cache links snapshots/<revision>/<file> to ../../blobs/<hash>.
    in_hub_cache = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if not (real.is_relative_to(root) or in_hub_cache):
        raise HFError(f"{where}, a link to {str(real)!r} outside the model directory; {fix}")
    return path


def _read_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from a validated ``model.safetensors.index.json``."""
    index = path / INDEX_FILE
    where = f"safetensors index {str(index)!r}"
    fix = "fetch or export the model again"
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{where} is not valid JSON ({e}); {fix}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(weight_map if isinstance(data, dict) else data).__name__
        raise HFError(
            f"{where}: field 'weight_map' must be a non-empty JSON object of tensor name -> "
            f"shard file name, got {got}; {fix}"
        )
    root = path.resolve()
    shards = {s: _shard(index, root, s) for s in dict.fromkeys(weight_map.values())}
    return {name: shards[shard] for name, shard in weight_map.items()}


def checkpoint_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a HF model directory (``model.safetensors`` or sharded with an index).

    Only headers are read. The index file may name only shard files inside ``path``.

    Raises:
      HFError: no weights, an index that is not valid or names a shard that is absent or
        outside ``path``, a shard that lacks a tensor the index puts in it, or a file that is
        truncated or corrupt.
    """
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        weight_map = _read_index(path)
        headers = {file: read_header(file) for file in dict.fromkeys(weight_map.values())}
        out: dict[str, TensorInfo] = {}
        for infos in headers.values():
            out.update(infos)
        for name, file in weight_map.items():  # the index decides a tensor stored twice
            if name not in headers[file]:
                raise HFError(
                    f"safetensors index {str(path / INDEX_FILE)!r} puts tensor {name!r} in "
                    f"{file.name!r}, which lacks it; fetch or export the model again"
                )
            out[name] = headers[file][name]
        return out
    if (path / SINGLE_FILE).is_file():
        return read_header(path / SINGLE_FILE)
    raise HFError(
        f"{str(path)!r} holds no safetensors weights: expected {SINGLE_FILE} or {INDEX_FILE} "
        "with its shards (PyTorch .bin checkpoints are not read: re-save with "
        "save_pretrained(..., safe_serialization=True))"
    )


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

    Hand-written because the library's writer (``serialize_file``) takes a raw pointer to
    every tensor of the file in one call, so all of them must be in memory together; here a
    :class:`LazyTensor` is produced only when its bytes are written, one at a time
    (test_library_writer_holds_every_tensor_ours_holds_one shows it). The written header is
    read back by the library before returning.

    Args:
      file: the file to create.
      tensors: name -> array (numpy, jax) or :class:`LazyTensor`, written in this order.
      metadata: string metadata; defaults to ``{"format": "pt"}`` (what transformers wants).

    Raises:
      HFError: a dtype safetensors cannot store, metadata that is not str -> str, a tensor
        named ``__metadata__``, or a LazyTensor whose data differs from its declared shape.
    """
    metadata = dict(metadata or {"format": "pt"})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HFError(f"safetensors metadata must map str to str, got {metadata!r}")
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        dtype = np.dtype(t.dtype)
        if dtype not in _CODES:
            raise HFError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        if name in header or not isinstance(name, str):
            raise HFError(f"{name!r} cannot name a tensor in a safetensors file")
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
    read_header(file)
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


def hf_layout_shape(fn: Callable, *args: Any, shape: Sequence[int], dtype: Any) -> Any:
    """Calls a name-map function on a zero-memory placeholder of ``shape`` (shapes only)."""
    return fn(*args, np.broadcast_to(np.zeros((), dtype), tuple(shape)))


__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "LazyTensor",
    "TensorInfo",
    "checkpoint_index",
    "hf_layout_shape",
    "iter_tensors",
    "parse_size",
    "read_header",
    "read_tensor",
    "write_safetensors",
    "write_weights",
]
