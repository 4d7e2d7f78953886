"""transformers' bitsandbytes 4-bit checkpoints: read into NF4 leaves, and write them.

A 4-bit ``nn.Linear`` weight ``W`` is stored as ``W`` (packed uint8 codes, ``(n/2, 1)``),
``W.absmax``, ``W.quant_map`` and, with double quantization, ``W.nested_absmax`` and
``W.nested_quant_map``, plus ``W.quant_state.bitsandbytes__<nf4|fp4>``: a JSON blob as
uint8 bytes (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype,
nested_offset). :func:`parts_of_index` folds these entries into one logical tensor per
weight (its shape and dtype from the blob) so that the loader's header checks see the
unquantized model; :func:`read_nf4` builds the NF4 leaf from the stored bytes as they are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.errors import HFError
from jlora.hf.io import LazyTensor, TensorInfo, read_tensor
from jlora.quant.nf4 import CODES, NF4, dynamic_map

_STATE = ".quant_state.bitsandbytes__"
_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def check_config(hf_config: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config.json if it is bitsandbytes 4-bit (else an
    :class:`HFError` naming what jlora cannot read), None when there is none."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "bitsandbytes" or not qc.get(
            "load_in_4bit"):
        method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
        eight = isinstance(qc, Mapping) and qc.get("load_in_8bit")
        raise HFError(
            f"{where}: quantization_config={method!r}{' 8-bit' if eight else ''}; jlora "
            "reads bitsandbytes 4-bit (NF4/FP4) checkpoints only. Load it in transformers, "
            "call model.dequantize() and save_pretrained the result.")
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    if qt not in CODES:
        raise HFError(f"{where}: quantization_config.bnb_4bit_quant_type={qt!r}; jlora reads "
                      "bitsandbytes NF4 and FP4 4-bit checkpoints only.")
    return dict(qc)


@dataclasses.dataclass(frozen=True)
class Parts:
    """The stored entries of one 4-bit weight and its decoded quant state."""

    weight: TensorInfo
    extra: dict[str, TensorInfo]
    state: dict[str, Any]


def parts_of_index(index: dict[str, TensorInfo], where: str
                   ) -> tuple[dict[str, TensorInfo], dict[str, Parts]]:
    """``(index, parts)``: the index with each 4-bit weight as one logical tensor (shape and
    dtype from its quant state) and its side entries removed; ``{name: Parts}``."""
    states = [n for n in index if _STATE in n]
    if not states:
        return index, {}
    out = dict(index)
    parts: dict[str, Parts] = {}
    for key in states:
        name, _, qt = key.partition(_STATE)
        if qt not in CODES:
            raise HFError(
                f"{where}: {key!r} holds a 4-bit weight of quant type {qt!r}; jlora reads "
                "bitsandbytes NF4 and FP4 only (requantize it as nf4 in transformers).")
        raw = read_tensor(index[key])
        try:
            state = json.loads(bytes(np.asarray(raw, np.uint8)).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HFError(f"{where}: {key!r} is not bitsandbytes' JSON quant state "
                          f"({e}).") from None
        if state.get("quant_type", qt) != qt or state.get("dtype") not in _DTYPES:
            raise HFError(f"{where}: {key!r} has quant state {state}; jlora reads "
                                    f"{sorted(CODES)} with dtype in {sorted(_DTYPES)}.")
        extra = {s: out.pop(name + s) for s in _SUFFIXES if name + s in out}
        out.pop(key)
        if name not in out or ".absmax" not in extra or ".quant_map" not in extra:
            raise HFError(f"{where}: 4-bit weight {name!r} lacks its packed codes, absmax or "
                          "quant_map entries; the checkpoint is incomplete.")
        w = out[name]
        shape = tuple(int(d) for d in state["shape"])
        out[name] = dataclasses.replace(w, dtype=np.dtype(_DTYPES[state["dtype"]]), shape=shape)
        parts[name] = Parts(w, extra, state)
    return out, parts


def _check_map(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.shape != want.shape or not np.array_equal(got.astype(np.float32), want):
        raise HFError(f"{what} differs from bitsandbytes' code book; jlora reads "
                                "checkpoints made with bitsandbytes' standard NF4/FP4 maps.")


def read_nf4(parts: Parts, converted_shape: tuple[int, ...], transposed: bool,
             dtype: Any) -> NF4:
    """The NF4 leaf of one stored 4-bit weight: its bytes as they are, never dequantized."""
    s, name = parts.state, parts.weight.name
    if not transposed or len(converted_shape) != 2:
        raise HFError(f"{name!r}: jlora reads 4-bit weights of nn.Linear layers "
                                "(an (out, in) weight that becomes an (in, out) kernel) only.")
    qt, block = s["quant_type"], int(s["blocksize"])
    _check_map(read_tensor(parts.extra[".quant_map"]), CODES[qt], f"{name}.quant_map")
    codes = np.asarray(read_tensor(parts.weight)).reshape(-1).view(np.uint8)
    absmax = np.asarray(read_tensor(parts.extra[".absmax"])).reshape(-1)
    nested = offset = None
    if ".nested_absmax" in parts.extra:
        if int(s.get("nested_blocksize", 256)) != 256:
            raise HFError(f"{name!r}: nested_blocksize {s['nested_blocksize']}; "
                                    "jlora reads bitsandbytes' 256.")
        _check_map(read_tensor(parts.extra[".nested_quant_map"]), dynamic_map(),
                   f"{name}.nested_quant_map")
        nested = jnp.asarray(read_tensor(parts.extra[".nested_absmax"]), jnp.float32)
        offset = jnp.float32(s["nested_offset"])
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    n = int(np.prod(converted_shape))
    if codes.size * 2 != n or absmax.size != n // block:
        raise HFError(f"{name!r}: {codes.size} code bytes and {absmax.size} scales do not "
                      f"fit shape {tuple(s['shape'])} with blocksize {block}.")
    return NF4(jnp.asarray(codes), jnp.asarray(absmax), nested, offset, shape=converted_shape,
               dtype=dtype, block_size=block, quant_type=qt)


def tensors_of(name: str, q: NF4) -> dict[str, LazyTensor]:
    """What bitsandbytes' ``Linear4bit`` saves for weight ``name`` (the inverse of
    :func:`read_nf4`)."""
    def lazy(x, dtype):
        return LazyTensor(tuple(np.shape(x)), np.dtype(dtype),
                          lambda: np.asarray(x).astype(dtype))

    state = {"quant_type": q.quant_type, "blocksize": q.block_size, "dtype": q.dtype.name,
             "shape": list(q.shape[::-1])}
    out = {name: LazyTensor((q.codes.shape[0], 1), np.dtype(np.uint8),
                            lambda: np.asarray(q.codes).reshape(-1, 1)),
           name + ".absmax": lazy(q.absmax, q.absmax.dtype),
           name + ".quant_map": lazy(CODES[q.quant_type], np.float32)}
    if q.double_quant:
        out[name + ".nested_absmax"] = lazy(q.nested_absmax, np.float32)
        out[name + ".nested_quant_map"] = lazy(dynamic_map(), np.float32)
        state |= {"nested_blocksize": 256, "nested_dtype": "float32",
                  "nested_offset": float(q.offset)}
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    out[name + _STATE + q.quant_type] = LazyTensor(blob.shape, np.dtype(np.uint8), lambda: blob)
    return out


def quantization_config(leaves: list[NF4], skipped: list[str]) -> dict[str, Any]:
    """transformers' ``quantization_config`` for a model whose linear layers are ``leaves``
    (all of one kind) and whose unquantized linear modules are ``skipped``."""
    kinds = {(q.quant_type, q.double_quant, q.block_size) for q in leaves}
    if len(kinds) != 1 or next(iter(kinds))[2] != 64:
        raise HFError(f"save_merged: transformers' 4-bit checkpoints hold one quantization for "
                      f"every layer with blocksize 64; this tree mixes {sorted(kinds)}.")
    qt, dq, _ = next(iter(kinds))
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": qt, "bnb_4bit_use_double_quant": dq,
            "bnb_4bit_compute_dtype": leaves[0].dtype.name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skipped or None}


__all__ = ["Parts", "check_config", "parts_of_index", "quantization_config", "read_nf4",
           "tensors_of"]
