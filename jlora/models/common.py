"""Pieces the architectures share: activations, config checks, attention, KV cache, name map.

Internal to :mod:`jlora.models`; each helper does exactly what the architecture modules did
inline, so outputs are unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import schema
from jlora.errors import HFError
from jlora.models.base import ParamPath

_T = TypeVar("_T")

def _gelu_erf(x):
    """Exact GELU, ``x * Phi(x)``, written with ``erf`` as PyTorch's ``gelu`` is.

    flax's ``nn.gelu(approximate=False)`` goes through ``erfc``, which XLA:CPU expands into
    an exponential and two rational fits: 3.7x slower than ``erf``'s single fit (measured on
    a (3072, 1536) float32 array); the two agree within 1e-6.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


_ALL_ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu_erf,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activations(*names: str) -> dict[str, Callable]:
    """transformers' ``ACT2FN`` entries ``names``, as jax functions.

    Example:
      >>> sorted(activations("silu", "relu"))
      ['relu', 'silu']
    """
    return {n: _ALL_ACTIVATIONS[n] for n in names}


# config.json fields of any architecture that switch on what jlora's models do not implement.
UNSUPPORTED: dict[str, schema.Field] = {
    "quantization_config": schema.unsupported(
        "jlora loads unquantized checkpoints only",
        "load it in transformers, call model.dequantize() and save_pretrained the result",
    ),
    "pruned_heads": schema.unsupported(
        "jlora's models keep every attention head", "save the model before pruning its heads"
    ),
}


def check_heads(arch: str, config: Any, hidden: str, heads: str) -> None:
    """Raises :class:`HFError` unless field ``hidden`` of ``config`` divides by ``heads``."""
    h, n = getattr(config, hidden), getattr(config, heads)
    if h % n:
        raise HFError(f"{arch} {hidden}={h} is not divisible by {heads}={n}; fix config.json.")


def check_activation(arch: str, config: Any, field: str, table: Mapping[str, Callable]) -> None:
    """Raises :class:`HFError` unless field ``field`` of ``config`` names an activation."""
    act = getattr(config, field)
    if act not in table:
        raise HFError(f"{arch} {field}={act!r} is not supported; use one of {sorted(table)}.")


def dataclass_from_hf(
    cls: type[_T],
    hf_config: Mapping[str, Any],
    fields: Mapping[str, schema.Field],
    source: str,
    divides: tuple[str, str] | None = None,
) -> _T:
    """``cls(**values)`` from the config.json entries ``fields`` checks (:func:`schema.read`).

    Only the entries named like a field of ``cls`` are passed to it. ``divides=(a, b)``: the
    value of ``b`` must divide that of ``a`` (heads that split the hidden size).

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class C:
      ...     n: int = 1
      >>> dataclass_from_hf(C, {"n": 3, "other": 0}, {"n": schema.integer()}, "config.json")
      C(n=3)
      >>> dataclass_from_hf(C, {"n": "3"}, {"n": schema.integer()}, "config.json")
      Traceback (most recent call last):
      ...
      jlora.errors.HFError: config.json: n='3' (a string) must be a positive int; ...
    """
    values = schema.read(hf_config, fields, source=source, error=HFError)
    if divides is not None:
        whole, part = divides
        if values[whole] % values[part]:
            raise schema.bad(
                HFError, source, part, values[part], f"a divisor of {whole}={values[whole]}"
            )
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in values.items() if k in names})


def materialize(table: jax.Array) -> jax.Array:
    """``table``, computed once and read by every consumer (exactly equal).

    XLA fuses cheap-looking elementwise producers into each of their consumers: the rotary
    ``sin``/``cos`` tables of a decoder were recomputed inside every layer's q and k
    fusions, forward and backward (40 times per step of an 8-layer Llama), and no barrier
    survives XLA:CPU's pipeline (``optimization_barrier`` is removed before fusion). A matmul
    by the identity is a fusion boundary: the table is written once. It is exact (each
    output is one product by 1.0 plus zeros) and costs ``2 t d^2`` FLOPs for a (t, d) table.

    Example:
      >>> t = jnp.cos(jnp.arange(6.0)).reshape(2, 3)
      >>> bool((materialize(t) == t).all())
      True
    """
    eye = jnp.eye(table.shape[-1], dtype=table.dtype)
    return jnp.dot(table, eye, precision=jax.lax.Precision.HIGHEST)


def softmax_attend(scores, v, mask, dropout: Callable):
    """Masked softmax of float32 ``scores`` (b, h, q, k), ``dropout``, then values (b, k, h, d).

    ``mask`` broadcasts to the scores; masked keys get the float32 minimum. Returns
    (b, q, h, d) in ``v``'s dtype.
    """
    w = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
    w = dropout(w)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def cache_slots(input_ids, attention_mask, cache):
    """Where ``input_ids`` (b, t) sit among the keys, by the contract of :mod:`.generate`.

    Returns ``(index, key_valid, q_slots, k_slots)``: the first slot the tokens fill (0
    without a cache); bool (b, keys) of real keys (``attention_mask`` of the new tokens,
    default ones, written into the cache's ``mask``); the query slots ``index + arange(t)``;
    the key slots ``arange(keys)``. A query attends to valid keys at slots ``<=`` its own.

    Example:
      >>> cache = {"index": jnp.asarray(2), "mask": jnp.asarray([[True, False, False]])}
      >>> index, valid, q, k = cache_slots(jnp.zeros((1, 1), int), None, cache)
      >>> valid.tolist(), q.tolist(), k.tolist()
      ([[True, False, True]], [2], [0, 1, 2])
    """
    b, t = input_ids.shape
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask > 0
    if cache is None:
        return jnp.zeros((), jnp.int32), new, jnp.arange(t), jnp.arange(t)
    index = cache["index"]
    key_valid = jax.lax.dynamic_update_slice(cache["mask"], new, (0, index))
    return index, key_valid, index + jnp.arange(t), jnp.arange(key_valid.shape[1])


def update_kv_cache(layer_cache: Mapping[str, Any], k, v, index, dtype):
    """Writes keys and values (b, t, heads, d) at slot ``index`` of a layer's cache.

    Returns ``(new_layer_cache, keys, values)``: all the cached keys and values, cast to
    ``dtype``.
    """
    update = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, new.astype(buf.dtype), (0, index, 0, 0)
    )
    keys, values = update(layer_cache["key"], k), update(layer_cache["value"], v)
    return {"key": keys, "value": values}, keys.astype(dtype), values.astype(dtype)


def empty_cache(
    batch_size: int, max_length: int, layers: int, kv_heads: int, head_dim: int, dtype: Any
) -> dict:
    """The empty KV cache :mod:`jlora.models.generate` specifies.

    Example:
      >>> c = empty_cache(2, 5, layers=1, kv_heads=3, head_dim=4, dtype=jnp.float32)
      >>> c["layers"]["0"]["key"].shape, c["mask"].shape
      ((2, 5, 3, 4), (2, 5))
    """
    shape = (batch_size, max_length, kv_heads, head_dim)
    layer = lambda: {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch_size, max_length), bool),
        "layers": {str(i): layer() for i in range(layers)},
    }


def linear_params_to_hf(
    arch: str, path: ParamPath, array: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """The transformers tensor of a param whose module is an ``nn.Linear`` in PyTorch.

    ``kernel`` -> ``weight`` transposed (a view: ``hf_layout_shape`` passes zero-memory
    placeholders), ``embedding`` / ``scale`` -> ``weight``, ``bias`` -> ``bias``.

    Example:
      >>> [(n, a.shape) for n, a in linear_params_to_hf("X", ("fc", "kernel"), np.ones((2, 3)))]
      [('fc.weight', (3, 2))]
    """
    *module, leaf = path
    module_name = ".".join(module)
    if leaf == "kernel":
        return [(f"{module_name}.weight", array.T)]
    if leaf in ("embedding", "scale"):
        return [(f"{module_name}.weight", array)]
    if leaf == "bias":
        return [(f"{module_name}.bias", array)]
    raise HFError(f"{arch} has no HF tensor for param {'.'.join(path)!r}; merge adapters first.")


def build(model_cls: Callable[..., _T], config: Any, dtype: Any = None) -> _T:
    """``model_cls(config)`` computing in and creating params of ``dtype`` (float32 default)."""
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    return model_cls(config, dtype=dtype, param_dtype=dtype)


def example_ids(max_length: int) -> tuple:
    """``model.init`` arguments: one row of ``min(8, max_length)`` token ids."""
    return (jnp.zeros((1, min(8, max_length)), jnp.int32),)
