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

from jlora import schema
from jlora.errors import HFError
from jlora.hf import bnb
from jlora.hf.io import TensorInfo, checkpoint_index, hf_layout_shape, read_tensor
from jlora.hf.output import note_source
from jlora.models import arch_spec
from jlora.models.base import ArchSpec, ParamPath
from jlora.quant.nf4 import check_quantizable, quantize_array
from jlora.quant.tree import select

# Heads that transformers ties to the input embedding, with the embeddings (canonical names)
# they tie to. Whether a model ties is the architecture's decision (its name map expects the
# head or not), with transformers' per-class default of tie_word_embeddings when config.json
# lacks the key: True for GPT-2 (and BERT), False for Llama, Mistral and Qwen2 (transformers 5).
_TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight")}
_MAX_LISTED = 10

logger = logging.getLogger(__name__)


def check_path(path: Any, what: str = "path") -> Path:
    """``path`` as a :class:`Path`, or an :class:`HFError` for what is not a usable path."""
    if not isinstance(path, str | os.PathLike):
        raise HFError(
            f"{what} must be a directory path (a str or os.PathLike), got "
            f"{type(path).__name__} {path!r:.60}."
        )
    try:
        text = os.fspath(path)
    except TypeError as e:
        raise HFError(f"{what}={path!r:.60} is not a path ({e}).") from None
    if not isinstance(text, str):
        raise HFError(f"{what}={path!r:.60} is a bytes path; pass it as a str.")
    if not text or "\0" in text:
        raise HFError(f"{what}={text!r:.60} is not a directory path; pass the model directory.")
    return Path(text)


def check_dtype(dtype: Any, what: str = "dtype") -> np.dtype | None:
    """``dtype`` as a numpy dtype jlora computes in (float32, bfloat16, float16; float64 with
    ``jax_enable_x64``), ``None`` kept; an :class:`HFError` for anything else.

    Example:
      >>> check_dtype("bfloat16")
      dtype(bfloat16)
      >>> check_dtype("int8")
      Traceback (most recent call last):
      ...
      jlora.errors.HFError: dtype='int8' (int8) is not a float dtype jlora computes in; ...
    """
    if dtype is None:
        return None
    allowed = [jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)]
    if jax.config.jax_enable_x64:
        allowed.append(jnp.dtype(jnp.float64))
    names = ", ".join(f"jnp.{d.name}" for d in allowed)
    try:
        dt = None if isinstance(dtype, bool) else jnp.dtype(dtype)
    except Exception:  # noqa: BLE001 (numpy raises TypeError, ValueError... for non-dtypes)
        dt = None
    if dt is None:
        raise HFError(f"{what}={dtype!r:.60} is not a dtype; pass one of {names} (or None).")
    if dt not in allowed:
        x64 = (
            " (float64 needs jax.config.update('jax_enable_x64', True))" if dt == np.float64 else ""
        )
        raise HFError(
            f"{what}={dtype!r:.60} ({dt}) is not a float dtype jlora computes in; pass one of "
            f"{names} (or None){x64}."
        )
    return dt


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a HF model directory, with clear errors for what is not one.

    Only the file's form is checked here (a JSON object with a string ``model_type``); the
    architecture's ``ArchSpec.check_config`` checks its fields.

    Raises:
      HFError: ``path`` is not a directory, has no (readable) config.json, or no model_type.
    """
    path = check_path(path)
    what = (
        "a Hugging Face model directory (what save_pretrained writes) holds config.json "
        "(with its model_type) and model.safetensors, or sharded "
        "model-0000i-of-0000n.safetensors files with model.safetensors.index.json"
    )
    if not path.is_dir():
        raise HFError(f"{str(path)!r} is not a directory; {what}")
    if not (path / "config.json").is_file():
        raise HFError(f"{str(path)!r} has no config.json; {what}")
    file = str(path / "config.json")
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{file!r} is not valid JSON ({e})") from None
    except (OSError, RecursionError) as e:
        raise HFError(f"{file!r} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise HFError(f"{file!r} has no model_type; {what}")
    if not isinstance(config["model_type"], str):
        raise schema.bad(
            HFError,
            repr(file),
            "model_type",
            config["model_type"],
            "a string naming the architecture (e.g. 'llama')",
        )
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


def load(path: str | os.PathLike, dtype: Any = None, *,
         quantize: bool | Mapping[str, Any] = False) -> tuple[Any, dict, dict[str, Any]]:
    """Builds the jlora model of a transformers checkpoint directory and loads its weights.

    Checks run cheapest first, and all before any work: the arguments; config.json, field by
    field (types, ranges, and features the model does not implement, see the architecture's
    ``from_hf``); then the safetensors headers against the tensor names, counts and shapes
    that config.json implies (missing / unexpected tensors, shapes, truncated files), before
    the model is built or traced and before any weight is read (only a stored tied head is
    read early, with its embedding, to compare them). Then the tensors are read, converted
    and placed one at a time, so host memory holds one full copy of the weights (the params)
    plus one tensor in flight.

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
      quantize: quantize linear kernels tensor by tensor while loading (``True``: as
        :func:`jlora.quantize` does by default; a dict: its keyword arguments, e.g.
        ``{"targets": ["q_proj", "v_proj"], "double_quant": False}``). A transformers
        bitsandbytes 4-bit checkpoint (``quantization_config`` with ``load_in_4bit``, NF4 or
        FP4) loads into :class:`jlora.NF4` leaves from its stored bytes either way, never
        dequantized; run such params through :func:`jlora.lora`.

    Returns:
      ``(model, params, hf_config)``: the linen module, ``{'params': ...}`` as
      ``model.init`` would return it, and the config.json dict (a copy with
      ``tie_word_embeddings: false`` where the checkpoint unties the head, see above).

    Raises:
      HFError: a ``path`` or ``dtype`` of the wrong kind (``dtype`` must be a float dtype);
        not a HF model directory; an unsupported ``model_type``; a config.json field that is
        missing, of the wrong type or value, or asks for what the model does not implement
        (named with the file and the fix); missing or unexpected tensors (missing ones named
        as the base model's transformers names), two tensors for one param, a tensor whose
        shape does not fit the config, or a truncated file.
    """
    path = check_path(path)
    dtype = check_dtype(dtype)
    note_source(path)  # completes an interrupted save there; no save may write there now
    hf_config = read_config(path)
    where = repr(str(path / "config.json"))
    if quant_cfg := bnb.check_config(hf_config, where):  # a bitsandbytes 4-bit checkpoint
        hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    spec = arch_spec(hf_config["model_type"])
    spec.check_config(hf_config, where)
    if not isinstance(quantize, bool | Mapping):
        raise HFError(f"quantize={quantize!r}: pass True, False or a dict of jlora.quantize's "
                      "keyword arguments.")
    # Cheap checks first: the headers against the sizes config.json gives, before any tensor
    # is read (but a tied head's, below) and before the model is built or traced.
    index, packed = bnb.parts_of_index(checkpoint_index(path), repr(str(path)))
    if quant_cfg and not packed:
        raise HFError(
            f"{where}: quantization_config={quant_cfg!r:.80} says bitsandbytes 4-bit, but the "
            "checkpoint holds no 4-bit weights (no '<name>.weight.quant_state.bitsandbytes__"
            "nf4' entries). Remove quantization_config from config.json, or keep the "
            "checkpoint transformers saved with it; to quantize while loading pass "
            "quantize=True.")
    layers = spec.num_layers(hf_config)
    if layers > len(index):  # every layer has tensors of its own: do not list them all
        raise HFError(
            f"the checkpoint in {str(path)!r} does not fit its config.json (model_type "
            f"{hf_config['model_type']!r}): config.json gives {layers} layers, but the "
            f"checkpoint holds {len(index)} tensors in all. Fix the layer count in config.json, "
            "or use the config.json saved with these weights."
        )
    layouts = {  # zero-memory placeholders in the params' layout: shapes only
        name: hf_layout_shape(spec.hf_to_params, name, shape=info.shape, dtype=info.dtype)
        for name, info in index.items()
    }
    hf_config = _untie_if_stored_apart(path, spec, hf_config, index, layouts)
    plan, initialised = _match_tensors(path, spec, hf_config, index, layouts)

    model = spec.build(hf_config, dtype)
    shapes = param_shapes(model, spec, hf_config)
    _check_traced(path, spec, hf_config, shapes, plan, initialised, layouts)
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
    chosen = _quantized_modules(shapes, quantize)
    for param_path, name in plan.items():
        if name in packed:  # stored in 4 bits: its bytes as they are
            flat[param_path] = bnb.read_nf4(packed[name], tuple(shapes[param_path].shape),
                                            _transposes(spec, name), shapes[param_path].dtype)
            continue
        array = read_tensor(index[name])
        _, converted = spec.hf_to_params(name, array)
        # jnp.array copies (jnp.asarray may alias host memory), so each tensor read is freed
        # at once and the loaded params are the only copy of the weights.
        flat[param_path] = jnp.array(converted, dtype=shapes[param_path].dtype)
        del array, converted
        if ".".join(param_path[:-1]) in chosen and param_path[-1] == "kernel":
            flat[param_path] = quantize_array(flat[param_path], where=".".join(param_path),
                                              **_quantize_kw(quantize))
    if quant_cfg:
        hf_config = {**hf_config, "quantization_config": quant_cfg}
    return model, {"params": unflatten_dict(flat)}, hf_config


def _quantize_kw(quantize: Any) -> dict[str, Any]:
    kw = dict(quantize) if isinstance(quantize, Mapping) else {}
    kw.pop("targets", None)
    kw.pop("exclude", None)
    return kw


def _quantized_modules(shapes: Mapping[ParamPath, Any], quantize: Any) -> set[str]:
    """The module paths whose kernels ``quantize`` chooses (before any tensor is read)."""
    if quantize is False:
        return set()
    kw = dict(quantize) if isinstance(quantize, Mapping) else {}
    unknown = set(kw) - {"targets", "exclude", "block_size", "double_quant", "quant_type"}
    if unknown:
        raise HFError(f"quantize: unknown keys {sorted(unknown)}; use targets, exclude, "
                      "block_size, double_quant, quant_type (jlora.quantize's arguments).")
    modules: dict[str, dict[str, Any]] = {}
    for p, leaf in shapes.items():
        modules.setdefault(".".join(p[:-1]), {})[p[-1]] = leaf
    chosen = select(modules, kw.get("targets", "all-linear"), kw.get("exclude"))
    for m in chosen:
        leaf = modules[m]["kernel"]
        check_quantizable(tuple(leaf.shape), leaf.dtype, kw.get("block_size", 64), f"{m}.kernel")
    return set(chosen)


def _transposes(spec: ArchSpec, name: str) -> bool:
    """Whether the name map stores tensor ``name`` transposed (an nn.Linear weight)."""
    converted = spec.hf_to_params(name, np.zeros((2, 3), np.float32))
    return converted is not None and np.shape(converted[1]) == (3, 2)


def _match_tensors(
    path: Path,
    spec: ArchSpec,
    hf_config: Mapping[str, Any],
    index: Mapping[str, TensorInfo],
    layouts: Mapping[str, Any],
) -> tuple[dict[ParamPath, str], dict[str, ParamPath]]:
    """Matches the stored tensors to the params config.json implies, from headers alone.

    Returns ``(plan, initialised)``: ``{param path: stored tensor name}`` and the optional
    tensors the checkpoint lacks ``{canonical name: param path}``. Raises one
    :class:`HFError` listing every missing, unexpected, doubled or misshapen tensor.
    """
    expected = spec.expected_hf_shapes(hf_config)
    canonical = dict(_paths(spec, expected))  # param path -> HF name
    optional = spec.optional_hf_keys(hf_config)
    plan: dict[ParamPath, str] = {}  # param path -> tensor name in the files
    unexpected, mismatched, twice, misshapen = [], [], [], set()
    for name, info in index.items():
        converted = layouts[name]
        if converted is None:
            continue  # a buffer (rotary inv_freq) or a task head the base model lacks
        param_path = converted[0]
        if param_path not in canonical:
            if name not in _TIED_HEADS:
                unexpected.append(name)
            # else: a tied head stored anyway, equal to the embedding (_untie_if_stored_apart)
        elif param_path in plan:
            twice.append(f"{plan[param_path]!r} and {name!r} are both {canonical[param_path]!r}")
        elif tuple(info.shape) != tuple(want := expected[canonical[param_path]]):
            misshapen.add(param_path)
            mismatched.append(
                f"{name!r} has shape {tuple(info.shape)} in {info.file.name} but config.json "
                f"implies {tuple(want)}"
            )
        else:
            plan[param_path] = name
    absent = {canonical[p]: p for p in canonical if p not in plan and p not in misshapen}
    initialised = {n: p for n, p in absent.items() if n in optional}
    missing = set(absent) - set(initialised)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
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
    return plan, initialised


def _check_traced(
    path: Path,
    spec: ArchSpec,
    hf_config: Mapping[str, Any],
    shapes: Mapping[ParamPath, Any],
    plan: Mapping[ParamPath, str],
    initialised: Mapping[str, ParamPath],
    layouts: Mapping[str, Any],
) -> None:
    """The traced params agree with what the headers were checked against (a spec's promise:
    a failure here is a bug in the architecture's ``expected_hf_shapes``)."""
    filled = set(plan) | set(initialised.values())
    problems = []
    if unfilled := set(shapes) - filled:
        problems.append(f"params no tensor fills: {_listed('.'.join(p) for p in unfilled)}")
    if absent := filled - set(shapes):
        problems.append(f"tensors for no param: {_listed('.'.join(p) for p in absent)}")
    for param_path, name in plan.items():
        got = tuple(layouts[name][1].shape)
        if param_path in shapes and got != tuple(shapes[param_path].shape):
            problems.append(f"{name!r} gives {got} for a param of shape {shapes[param_path].shape}")
    if problems:
        raise HFError(
            f"the checkpoint in {str(path)!r} passed its header checks but the model "
            f"jlora builds for model_type {hf_config['model_type']!r} differs (a jlora bug, "
            "please report it): " + ". ".join(problems[:_MAX_LISTED])
        )


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
        emb, stored_head = index[stored[0]], index[head]
        if emb.shape == stored_head.shape and np.array_equal(
            read_tensor(emb), read_tensor(stored_head)
        ):
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


__all__ = ["check_dtype", "check_path", "load", "param_shapes", "read_config"]
