"""Load a transformers model directory (config.json + safetensors) into a jlora linen model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from jlora.errors import HFError
from jlora.hf.io import checkpoint_index, hf_layout_shape, read_tensor
from jlora.models import arch_spec
from jlora.models.base import ArchSpec, ParamPath

# Heads that transformers ties to the input embedding; a tied checkpoint may still store them.
_TIED_HEADS = ("lm_head.weight",)
_MAX_LISTED = 10


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a HF model directory, with clear errors for what is not one.

    Raises:
      HFError: ``path`` is not a directory, has no (readable) config.json, or no model_type.
    """
    path = Path(path)
    what = (
        "a Hugging Face model directory (what save_pretrained writes) holds config.json "
        "(with its model_type) and model.safetensors, or sharded "
        "model-0000i-of-0000n.safetensors files with model.safetensors.index.json"
    )
    if not path.is_dir():
        raise HFError(f"{str(path)!r} is not a directory; {what}")
    if not (path / "config.json").is_file():
        raise HFError(f"{str(path)!r} has no config.json; {what}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{str(path / 'config.json')!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise HFError(f"{str(path / 'config.json')!r} has no model_type; {what}")
    return config


def param_shapes(model: Any, spec: ArchSpec, hf_config: Mapping[str, Any]) -> dict[ParamPath, Any]:
    """``{param path: ShapeDtypeStruct}`` of ``model``'s 'params', from a shape-only init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *spec.example_inputs(hf_config))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in keypath): leaf for keypath, leaf in flat}


def _listed(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:_MAX_LISTED]) + more


def load(path: str | os.PathLike, dtype: Any = None) -> tuple[Any, dict, dict[str, Any]]:
    """Builds the jlora model of a transformers checkpoint directory and loads its weights.

    Every check (architecture, missing / unexpected tensors, shapes, truncated files) runs on
    the safetensors headers before any weight is read; then the tensors are read, converted
    and placed one at a time.

    Args:
      path: a directory written by transformers' ``save_pretrained`` (safetensors).
      dtype: dtype of the params and of the computation; ``None`` for float32.

    Returns:
      ``(model, params, hf_config)``: the linen module, ``{'params': ...}`` as
      ``model.init`` would return it, and the config.json dict.

    Raises:
      HFError: not a HF model directory, an unsupported ``model_type``, missing or unexpected
        tensors, a tensor whose shape does not fit the config, or a truncated file.
    """
    path = Path(path)
    hf_config = read_config(path)
    spec = arch_spec(hf_config["model_type"])
    model = spec.build(hf_config, dtype)
    shapes = param_shapes(model, spec, hf_config)
    index = checkpoint_index(path)
    tied = bool(hf_config.get("tie_word_embeddings", False))

    expected = spec.expected_hf_keys(hf_config)
    plan: dict[str, ParamPath] = {}
    unexpected, mismatched = [], []
    for name, info in index.items():
        converted = hf_layout_shape(spec.hf_to_params, name, shape=info.shape, dtype=info.dtype)
        if converted is None or (tied and name in _TIED_HEADS and name not in expected):
            continue  # a buffer (rotary inv_freq) or a tied head stored anyway
        param_path, array = converted
        if name not in expected or param_path not in shapes:
            unexpected.append(name)
        elif tuple(array.shape) != tuple(shapes[param_path].shape):
            want = hf_layout_shape(
                spec.params_to_hf, param_path, shape=shapes[param_path].shape, dtype=np.float32
            )
            want_shape = dict((n, a.shape) for n, a in want).get(name, shapes[param_path].shape)
            mismatched.append(
                f"{name!r} has shape {tuple(info.shape)} in {info.file.name} but config.json "
                f"implies {tuple(want_shape)}"
            )
        else:
            plan[name] = param_path
    missing = expected - set(index)
    unfilled = set(shapes) - set(plan.values()) - {p for n, p in _paths(spec, missing)}
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unfilled:
        problems.append(f"params no tensor fills: {_listed('.'.join(p) for p in unfilled)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listed(unexpected)}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:_MAX_LISTED]))
    if problems:
        raise HFError(
            f"the checkpoint in {str(path)!r} does not fit its config.json "
            f"(model_type {hf_config['model_type']!r}): " + ". ".join(problems)
        )

    flat = {}
    for name, param_path in plan.items():
        array = read_tensor(index[name])
        _, converted = spec.hf_to_params(name, array)
        flat[param_path] = jnp.asarray(converted, dtype=shapes[param_path].dtype)
        del array, converted
    return model, {"params": unflatten_dict(flat)}, hf_config


def _paths(spec: ArchSpec, names) -> list[tuple[str, ParamPath]]:
    """Param paths of tensor names absent from the file (reported as missing already)."""
    out = []
    for name in names:
        converted = spec.hf_to_params(name, np.zeros((1, 1), np.float32))
        if converted is not None:
            out.append((name, converted[0]))
    return out


__all__ = ["load", "param_shapes", "read_config"]
