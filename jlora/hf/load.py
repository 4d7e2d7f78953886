"""Load a transformers model directory (config.json + safetensors) into a jlora linen model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jlora.errors import HFError
from jlora.hf.io import TensorInfo, checkpoint_index, hf_layout_shape, read_tensor
from jlora.models import arch_spec
from jlora.models.base import ArchSpec, ParamPath

# Heads that transformers ties to the input embedding, with the embeddings (canonical names)
# they tie to. Whether a model ties is the architecture's decision (its name map expects the
# head or not), with transformers' per-class default of tie_word_embeddings when config.json
# lacks the key: True for GPT-2 (and BERT), False for Llama, Mistral and Qwen2 (transformers 5).
_TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight")}
_MAX_LISTED = 10

logger = logging.getLogger(__name__)


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
    the safetensors headers before any weight is read (only a stored tied head is read early,
    with its embedding, to compare them); then the tensors are read, converted and placed one
    at a time, so host memory holds one full copy of the weights (the params) plus one tensor
    in flight.

    Tensors are matched by the param they fill (``spec.hf_to_params``), so checkpoints of a
    task model (``BertForMaskedLM``'s ``bert.`` prefix, GPT-2 with or without
    ``transformer.``) load; heads and buffers the name map drops are skipped.

    An output head that the model ties to the input embedding (``tie_word_embeddings``, with
    transformers' per-architecture default when config.json lacks it) is ignored when stored
    anyway equal to the embedding; stored with other values it is loaded untied, as
    transformers does (logged; the returned ``hf_config`` says ``tie_word_embeddings:
    false``).

    Tensors the architecture declares optional (``spec.optional_hf_keys``, e.g. BERT's
    pooler) that the checkpoint lacks are initialised as ``model.init(jax.random.key(0),
    ...)`` would, and logged (logger ``jlora.hf.load``), as transformers' ``AutoModel``
    initialises them randomly with a warning. Any other missing tensor is an error.

    Args:
      path: a directory written by transformers' ``save_pretrained`` (safetensors).
      dtype: dtype of the params and of the computation; ``None`` for float32.

    Returns:
      ``(model, params, hf_config)``: the linen module, ``{'params': ...}`` as
      ``model.init`` would return it, and the config.json dict (a copy with
      ``tie_word_embeddings: false`` where the checkpoint unties the head, see above).

    Raises:
      HFError: not a HF model directory, an unsupported ``model_type``, missing or unexpected
        tensors (missing ones named as the base model's transformers names), two tensors for
        one param, a tensor whose shape does not fit the config, or a truncated file.
    """
    path = Path(path)
    hf_config = read_config(path)
    spec = arch_spec(hf_config["model_type"])
    index = checkpoint_index(path)
    layouts = {  # zero-memory placeholders in the params' layout: shapes only
        name: hf_layout_shape(spec.hf_to_params, name, shape=info.shape, dtype=info.dtype)
        for name, info in index.items()
    }
    hf_config = _untie_if_stored_apart(path, spec, hf_config, index, layouts)
    model = spec.build(hf_config, dtype)
    shapes = param_shapes(model, spec, hf_config)

    canonical = dict(_paths(spec, spec.expected_hf_keys(hf_config)))  # param path -> HF name
    optional = spec.optional_hf_keys(hf_config)
    plan: dict[ParamPath, str] = {}  # param path -> tensor name in the files
    unexpected, mismatched, twice = [], [], []
    for name, info in index.items():
        converted = layouts[name]
        if converted is None:
            continue  # a buffer (rotary inv_freq) or a task head the base model lacks
        param_path, array = converted
        if param_path not in canonical or param_path not in shapes:
            if name not in _TIED_HEADS:
                unexpected.append(name)
            # else: a tied head stored anyway, equal to the embedding (_untie_if_stored_apart)
        elif param_path in plan:
            twice.append(f"{plan[param_path]!r} and {name!r} are both {canonical[param_path]!r}")
        elif tuple(array.shape) != tuple(shapes[param_path].shape):
            want = hf_layout_shape(
                spec.params_to_hf, param_path, shape=shapes[param_path].shape, dtype=np.float32
            )
            want_shape = dict((n, a.shape) for n, a in want).get(
                canonical[param_path], shapes[param_path].shape
            )
            mismatched.append(
                f"{name!r} has shape {tuple(info.shape)} in {info.file.name} but config.json "
                f"implies {tuple(want_shape)}"
            )
        else:
            plan[param_path] = name
    absent = {canonical[p]: p for p in canonical if p not in plan}
    initialised = {n: p for n, p in absent.items() if n in optional and p in shapes}
    missing = set(absent) - set(initialised)
    unfilled = set(shapes) - set(canonical)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unfilled:
        problems.append(f"params no tensor fills: {_listed('.'.join(p) for p in unfilled)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listed(unexpected)}")
    if twice:
        problems.append("tensors for the same param: " + "; ".join(twice[:_MAX_LISTED]))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:_MAX_LISTED]))
    if problems:
        raise HFError(
            f"the checkpoint in {str(path)!r} does not fit its config.json "
            f"(model_type {hf_config['model_type']!r}): " + ". ".join(problems)
        )

    flat = {}
    if initialised:
        flat.update(_init_params(model, spec, hf_config, list(initialised.values())))
        logger.warning(
            "%s: the checkpoint lacks %s, optional for model_type %r: initialised as "
            "model.init(jax.random.key(0), ...) gives them (transformers' %s initialises "
            "them randomly too)",
            path,
            _listed(initialised),
            hf_config["model_type"],
            spec.auto_class,
        )
    for param_path, name in plan.items():
        array = read_tensor(index[name])
        _, converted = spec.hf_to_params(name, array)
        # jnp.array copies (jnp.asarray may alias host memory), so each tensor read is freed
        # at once and the loaded params are the only copy of the weights.
        flat[param_path] = jnp.array(converted, dtype=shapes[param_path].dtype)
        del array, converted
    return model, {"params": unflatten_dict(flat)}, hf_config


def _untie_if_stored_apart(
    path: Path,
    spec: ArchSpec,
    hf_config: dict[str, Any],
    index: Mapping[str, TensorInfo],
    layouts: Mapping[str, Any],
) -> dict[str, Any]:
    """``hf_config``, untied (a copy) where transformers would not tie the stored head.

    transformers 5 ties a head only if the checkpoint lacks it or stores it equal to the
    embedding; a stored head that differs is loaded as a separate weight (with a warning to
    set ``tie_word_embeddings: false``). The same happens here: this reads those two tensors.
    """
    expected = spec.expected_hf_keys(hf_config)
    for head, sources in _TIED_HEADS.items():
        if head not in index or head in expected:
            continue
        source = next((n for n in sources if n in expected), None)
        if source is None:
            continue
        source_path = _paths(spec, [source])[0][0]
        stored = [n for n, c in layouts.items() if c is not None and c[0] == source_path]
        if len(stored) != 1:
            continue  # the embedding is missing or stored twice: load reports it
        if np.array_equal(read_tensor(index[stored[0]]), read_tensor(index[head])):
            continue
        logger.warning(
            "%s: config.json ties %r to %r (tie_word_embeddings %s), but the checkpoint stores "
            "them with different values; loading them untied, as transformers does, and "
            "returning hf_config with tie_word_embeddings: false",
            path,
            head,
            stored[0],
            "set" if "tie_word_embeddings" in hf_config else "unset, default true",
        )
        hf_config = {**hf_config, "tie_word_embeddings": False}
    return hf_config


def _init_params(
    model: Any, spec: ArchSpec, hf_config: Mapping[str, Any], paths: list[ParamPath]
) -> dict[ParamPath, jax.Array]:
    """The params ``paths`` as ``model.init(jax.random.key(0), ...)`` gives them.

    Under ``jit`` only these leaves are outputs, so XLA computes only their initialisers
    (flax derives each param's rng from its path): no full random copy of the model exists.
    """
    inputs = spec.example_inputs(hf_config)

    def init(key):
        flat = flatten_dict(model.init(key, *inputs)["params"])
        return [flat[p] for p in paths]

    return dict(zip(paths, jax.jit(init)(jax.random.key(0))))


def _paths(spec: ArchSpec, names) -> list[tuple[ParamPath, str]]:
    """``(param path, name)`` of each HF tensor name that fills a param (shapes only)."""
    out = []
    for name in names:
        converted = spec.hf_to_params(name, np.zeros((1, 1), np.float32))
        if converted is not None:
            out.append((converted[0], name))
    return out


__all__ = ["load", "param_shapes", "read_config"]
