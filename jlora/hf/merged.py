"""Export a (merged) jlora model as a transformers checkpoint directory."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jlora import paths as P
from jlora.errors import HFError
from jlora.hf import bnb
from jlora.hf.io import LazyTensor, hf_layout_shape, parse_size, write_weights
from jlora.hf.load import param_shapes
from jlora.hf.output import MERGED_METADATA, MERGED_MODEL, check_target, write_output
from jlora.merge import fold_modules
from jlora.models import arch_spec
from jlora.quant.nf4 import is_quantized
from jlora.quant.tree import dequantize, requantize_like

_MAX_LISTED = 10
_HF_FLOATS = ("float32", "float16", "bfloat16")  # the floating dtypes transformers stores


def _hf_dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return name if name in _HF_FLOATS else "float32"


def _out_dtype(dtype: Any) -> np.dtype | None:
    """``dtype`` checked: None or a floating dtype a transformers checkpoint stores."""
    if dtype is None:
        return None
    fix = "pass jnp.float32, jnp.float16 or jnp.bfloat16, or None to keep the params' dtypes"
    try:
        out = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise HFError(f"save_merged: dtype {dtype!r} is not a dtype; {fix}") from None
    if out.name not in _HF_FLOATS:
        raise HFError(
            f"save_merged: dtype {out.name} cannot hold the weights (transformers loads a "
            f"model's weights as floats: an integer or bool cast would lose them); {fix}"
        )
    return out


def save_merged(
    model: Any,
    params: Any,
    hf_config: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
    overwrite: bool = False,
    bnb_4bit: bool = False,
) -> Path:
    """Writes config.json and safetensors weights that transformers loads as this model.

    Adapters still in ``params`` are folded in first (``jlora.merge(params, unload=True)``),
    so an adapted tree exports the model it computes. Every check runs before anything is
    written, and the write is crash-safe: an interrupted export leaves the previous export at
    ``path`` (or nothing that loads), and the next save or :func:`jlora.hf.load` completes or
    clears it (see :mod:`jlora.hf.output`). A save refuses a base model's directory (a
    transformers checkpoint save_merged did not write) and, unless ``overwrite=True``, the
    current directory or a parent of it, a directory :func:`jlora.hf.load` read, and one
    that holds other files without being a save_merged export. It replaces only config.json
    and the weight files (``model.safetensors``, shards, index), removing those of an
    earlier export that the new one lacks; tokenizer files and any others stay.

    Args:
      model: the linen module (from :func:`jlora.hf.load.load`); the tree is checked
        against its param shapes before anything is written.
      params: ``{'params': ...}`` or a bare params tree, with or without adapters.
      hf_config: the config.json dict (``load``'s third result); written back with its
        ``dtype`` set to the weights' dtype.
      path: the directory: new, empty, or an earlier save_merged export.
      max_shard_size: shard the weights past this size (``"5GB"``, ``"500MiB"`` or bytes),
        with ``model.safetensors.index.json``, as transformers does.
      dtype: cast floating weights to this dtype: ``jnp.float32``, ``jnp.float16`` or
        ``jnp.bfloat16`` (what transformers stores); default: as is.
      overwrite: also write into the current directory (or a parent of it) or a directory
        holding other files; only the export's own files there are replaced.
      bnb_4bit: write the tree's NF4 kernels (:func:`jlora.quantize`, or a 4-bit checkpoint
        :func:`jlora.hf.load` read) as transformers' bitsandbytes 4-bit checkpoint (their
        codes and scales as they are; merged adapters are quantized again), with its
        ``quantization_config``. Default: NF4 kernels are written dequantized, a plain
        full-precision model.

    Returns:
      ``path``; ``transformers.<spec.auto_class>.from_pretrained(path)`` loads it with no
      missing or unexpected keys.

    Raises:
      OutputPathError: ``path`` is refused (the message says why and what to do instead).
      HFError: a bad argument (a ``dtype`` that is not float32/float16/bfloat16, a
        ``max_shard_size`` that is not a size), a param that is not floating, the tree does
        not fit the model (names the params), or adapter leaves remain that cannot be merged.
    """
    if not isinstance(hf_config, Mapping) or not isinstance(hf_config.get("model_type"), str):
        raise HFError(
            "save_merged: hf_config must be the config.json dict with its model_type "
            f"(jlora.hf.load's third result), got {type(hf_config).__name__}"
        )
    # a 4-bit checkpoint's quantization_config: written below only for bnb_4bit
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    dtype = _out_dtype(dtype)
    parse_size(max_shard_size)  # its error names the argument
    check_target(path, MERGED_MODEL, overwrite=overwrite)
    spec = arch_spec(hf_config["model_type"])
    # merge(..., unload=True) without its no-adapters error: a base tree passes unchanged
    tree = P.params_of(meta.unbox(params))
    P.check_adapters(tree, "save_merged")
    merged = fold_modules(tree, into=True, unload=True)
    # NF4 kernels: full arrays, or (bnb_4bit) 4-bit ones, merged adapters quantized again
    tree = requantize_like(merged, tree) if bnb_4bit else dequantize(merged)
    flat = {
        tuple(str(k.key) for k in keypath): leaf
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    }
    if bnb_4bit and not any(is_quantized(x) for x in flat.values()):
        raise HFError("save_merged(bnb_4bit=True): the tree holds no NF4 kernel; quantize it "
                      "first (jlora.quantize(params)).")
    leftover = [".".join(p) for p in flat if any(P.is_adapter_name(k) for k in p)]
    if leftover:
        raise HFError(f"adapter leaves remain after merging: {leftover[:_MAX_LISTED]}")
    shapes = param_shapes(model, spec, hf_config)
    missing, extra = set(shapes) - set(flat), set(flat) - set(shapes)
    wrong = [
        f"{'.'.join(p)} {tuple(flat[p].shape)} != {tuple(shapes[p].shape)}"
        for p in set(flat) & set(shapes)
        if tuple(flat[p].shape) != tuple(shapes[p].shape)
    ]
    if missing or extra or wrong:
        raise HFError(
            "the params do not fit the model built from hf_config: "
            f"missing {sorted('.'.join(p) for p in missing)[:_MAX_LISTED]}, "
            f"unexpected {sorted('.'.join(p) for p in extra)[:_MAX_LISTED]}, "
            f"wrong shapes {wrong[:_MAX_LISTED]}"
        )

    tensors: dict[str, LazyTensor] = {}
    out_dtypes = set()
    weights, quantized, skipped = set(), [], []
    for param_path, leaf in flat.items():
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise HFError(
                f"save_merged: param {'.'.join(param_path)} has dtype {leaf.dtype}; transformers "
                "loads weights as floats: cast the params to a float dtype first"
            )
        out_dtype = np.dtype(leaf.dtype)
        if dtype is not None and jnp.issubdtype(out_dtype, jnp.floating):
            out_dtype = np.dtype(dtype)
        out_dtypes.add(out_dtype)
        named = hf_layout_shape(spec.params_to_hf, param_path, shape=leaf.shape, dtype=out_dtype)
        weights.update(name for name, _ in named)
        if is_quantized(leaf):  # bitsandbytes' entries of a Linear4bit weight
            (name, placeholder), = named
            if tuple(placeholder.shape) != leaf.shape[::-1]:
                raise HFError(f"save_merged: {name!r} is not an nn.Linear weight; bitsandbytes "
                              "4-bit stores those only (jlora.dequantize this kernel).")
            tensors.update(bnb.tensors_of(name, leaf))
            quantized.append(leaf)
            continue
        if bnb_4bit and param_path[-1] == "kernel" and len(leaf.shape) == 2:
            skipped.extend(n.removesuffix(".weight") for n, _ in named)
        for i, (name, placeholder) in enumerate(named):
            load = lambda p=param_path, x=leaf, i=i, d=out_dtype: np.asarray(
                spec.params_to_hf(p, np.asarray(x))[i][1]
            ).astype(d, copy=False)
            tensors[name] = LazyTensor(tuple(placeholder.shape), out_dtype, load)
    expected = spec.expected_hf_keys(hf_config)
    if weights != expected:
        raise HFError(
            f"the export would not match transformers' names: missing "
            f"{sorted(expected - weights)[:_MAX_LISTED]}, unexpected "
            f"{sorted(weights - expected)[:_MAX_LISTED]}"
        )

    config = dict(hf_config)
    if quantized:
        config["quantization_config"] = bnb.quantization_config(quantized, skipped)
    floats = [d for d in out_dtypes if jnp.issubdtype(d, jnp.floating)]
    if floats:
        config["dtype"] = _hf_dtype_name(max(floats, key=lambda d: d.itemsize))
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
    with write_output(path, MERGED_MODEL, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_weights(tmp, tensors, max_shard_size, metadata=MERGED_METADATA)
    return Path(path)


__all__ = ["save_merged"]
