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
from jlora.hf.io import LazyTensor, hf_layout_shape, write_weights
from jlora.hf.load import param_shapes
from jlora.hf.output import atomic_dir
from jlora.merge import fold_modules
from jlora.models import arch_spec

_MAX_LISTED = 10


def _hf_dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def save_merged(
    model: Any,
    params: Any,
    hf_config: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> Path:
    """Writes config.json and safetensors weights that transformers loads as this model.

    Adapters still in ``params`` are folded in first (``jlora.merge(params, unload=True)``),
    so an adapted tree exports the model it computes. The directory is written atomically:
    an interrupted export leaves no loadable directory at ``path``.

    Args:
      model: the linen module (from :func:`jlora.hf.load.load`); the tree is checked
        against its param shapes before anything is written.
      params: ``{'params': ...}`` or a bare params tree, with or without adapters.
      hf_config: the config.json dict (``load``'s third result); written back with its
        ``dtype`` set to the weights' dtype.
      path: the directory to create (an existing one is replaced).
      max_shard_size: shard the weights past this size (``"5GB"``, ``"500MiB"`` or bytes),
        with ``model.safetensors.index.json``, as transformers does.
      dtype: cast floating weights to this dtype (e.g. ``jnp.bfloat16``); default: as is.

    Returns:
      ``path``; ``transformers.<spec.auto_class>.from_pretrained(path)`` loads it with no
      missing or unexpected keys.

    Raises:
      HFError: the tree does not fit the model (names the params), or adapter leaves remain
        that cannot be merged.
    """
    spec = arch_spec(hf_config["model_type"])
    # merge(..., unload=True) without its no-adapters error: a base tree passes unchanged
    tree = fold_modules(P.params_of(meta.unbox(params)), into=True, unload=True)
    flat = {
        tuple(str(k.key) for k in keypath): leaf
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
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
    for param_path, leaf in flat.items():
        out_dtype = np.dtype(leaf.dtype)
        if dtype is not None and jnp.issubdtype(out_dtype, jnp.floating):
            out_dtype = np.dtype(dtype)
        out_dtypes.add(out_dtype)
        named = hf_layout_shape(spec.params_to_hf, param_path, shape=leaf.shape, dtype=out_dtype)
        for i, (name, placeholder) in enumerate(named):
            load = lambda p=param_path, x=leaf, i=i, d=out_dtype: np.asarray(
                spec.params_to_hf(p, np.asarray(x))[i][1]
            ).astype(d, copy=False)
            tensors[name] = LazyTensor(tuple(placeholder.shape), out_dtype, load)
    expected = spec.expected_hf_keys(hf_config)
    if set(tensors) != expected:
        raise HFError(
            f"the export would not match transformers' names: missing "
            f"{sorted(expected - set(tensors))[:_MAX_LISTED]}, unexpected "
            f"{sorted(set(tensors) - expected)[:_MAX_LISTED]}"
        )

    config = dict(hf_config)
    floats = [d for d in out_dtypes if jnp.issubdtype(d, jnp.floating)]
    if floats:
        config["dtype"] = _hf_dtype_name(max(floats, key=lambda d: d.itemsize))
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_weights(tmp, tensors, max_shard_size)
    return path


__all__ = ["save_merged"]
