"""lora(fn): run a linen model with its adapters, without forming ΔW.

``lora(model.apply)`` has ``model.apply``'s signature. Inside, linen's method interception
adds ``dropout(x) @ A @ B * scale`` beside every adapted ``Dense``, ``DenseGeneral``,
``Einsum``, ``Conv`` and ``Embed`` (``__call__`` and ``attend``). An adapter that no supported
layer reads is merged into its kernel for that call (or raises, with
``on_unconsumed='raise'``): never silently ignored. ``mode='merge'`` merges every adapter on
read, for any JAX function of the params.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jlora import paths as P
from jlora.errors import ConfigError, LayoutError, UnconsumedAdapterError
from jlora.merge import copy_params, fold_copy, fold_modules, merge, weight_norm
from jlora.quant import dequantize, full, has_quantized, quantized_base

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
# Module paths a nested ``apply`` stands for (a model's scan over identical layers).
_ALIASES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "jlora_layer_aliases", default=None)


@contextlib.contextmanager
def layer_aliases(prefixes: Sequence[str]) -> Iterator[None]:
    """Inside, a module that a nested ``apply`` runs at relative path ``p`` stands for the
    modules ``f"{prefix}.{p}"`` of every prefix: how a model that scans one traced layer over
    the stacked params of its layers ``prefixes`` (jlora's llama with ``scan_layers=True``)
    tells :func:`lora` that the adapters of all those layers were consumed."""
    token = _ALIASES.set(tuple(prefixes))
    try:
        yield
    finally:
        _ALIASES.reset(token)


_DROP_BITS = 16


def _dropout(mod: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of the adapter input, from 16 random bits per element.

    A bernoulli draw costs a 32-bit threefry word per element; two 16-bit draws per word make
    the masks (a third of a small model's LoRA step on a CPU) about 4x cheaper. The drop
    probability is ``rate`` rounded to a multiple of 2**-16 (within 8e-6), and the kept
    values are scaled by the exact ``1 / (1 - p)`` of that probability, so the expectation
    is unchanged.
    """
    if rate <= 0.0 or not mod.scope.has_rng("dropout"):
        return x
    threshold = round(rate * 2**_DROP_BITS)
    if threshold == 0:
        return x
    # two 16-bit draws from each 32-bit word: half the threefry work of 16-bit bits
    words = jax.random.bits(mod.make_rng("dropout"), ((x.size + 1) // 2,), jnp.uint32)
    bits = jnp.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:x.size]
    keep = bits.reshape(x.shape) >= jnp.uint32(threshold)
    scale = 1.0 / (1.0 - threshold / 2**_DROP_BITS)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


def _free_letter(eq: str) -> str:
    return next(c for c in string.ascii_letters if c not in eq)


# ----------------------------------------------------------------------------- geometry
# How each layer kind maps its input and kernel to 2-D matrices and back.


def _input(args: tuple, kwargs: dict) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def _einsum_parts(mod: nn.Einsum, args: tuple, kwargs: dict, n_in: int):
    """``(input spec, kernel input letters, kernel output letters, output spec)``."""
    eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or mod.einsum_str
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->")
    xs, ks = lhs.split(",")
    return xs, ks[:n_in], ks[n_in:], out


def _dense_2d(mod: nn.Dense | nn.DenseGeneral, x: jax.Array, n_in: int):
    """A Dense/DenseGeneral input as (tokens, features): ``(x2d, leading shape)``."""
    axis = (-1,) if isinstance(mod, nn.Dense) else (
        mod.axis if isinstance(mod.axis, tuple | list) else (mod.axis,))
    axis = tuple(ax % x.ndim for ax in axis)
    if axis != tuple(range(x.ndim - n_in, x.ndim)):  # contracted axes last, in order
        x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
    lead = x.shape[:x.ndim - n_in]
    return x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])), lead


def _base(mod: nn.Module, args: tuple, kwargs: dict, x, kernel, n_in: int):
    """The layer's own ``x @ W`` without its bias (Dense, DenseGeneral, Einsum)."""
    prec = getattr(mod, "precision", None)
    x, kernel = promote_dtype(x, kernel, dtype=mod.dtype)
    if isinstance(mod, nn.Einsum):
        xs, kin, kout, out = _einsum_parts(mod, args, kwargs, n_in)
        return jnp.einsum(f"{xs},{kin}{kout}->{out}", x, kernel, precision=prec)
    x2d, lead = _dense_2d(mod, x, n_in)
    y = jnp.dot(x2d, kernel.reshape(x2d.shape[1], -1), precision=prec)
    return y.reshape(*lead, *kernel.shape[n_in:])


def _low_rank(x2d, a2d, b2d, s, prec):
    """``((x2d @ A) * scale) @ B`` on the 2-D token layout: the scale lands on the rank-r
    intermediate and every matmul is a plain (tokens, features) one, so the backward pass
    needs no transposed copy of the layer's output gradient."""
    t = jnp.dot(x2d, a2d, precision=prec) * s.astype(x2d.dtype)
    return jnp.dot(t, b2d, precision=prec)


def _embed_delta(mod: nn.Embed, method: str, args: tuple, a, b, s):
    if method == "attend":  # the tied head: q @ (A @ B).T = (q @ B.T) @ A.T
        q, a, b = promote_dtype(args[0], a, b, dtype=mod.dtype)
        q2d = q.reshape(-1, q.shape[-1])
        return _low_rank(q2d, b.T, a.T, s, None).reshape(*q.shape[:-1], a.shape[0])
    (a, b) = promote_dtype(a, b, dtype=mod.dtype)
    t = jnp.take(a, args[0], axis=0) * s.astype(a.dtype)
    return jnp.dot(t, b, precision=None)


def _delta(mod: nn.Module, args: tuple, kwargs: dict, x, a, b, s):
    """``scale * x @ A @ B`` in the layer's output layout, for its (dropped-out) input x."""
    prec = getattr(mod, "precision", None)
    x, a, b = promote_dtype(x, a, b, dtype=mod.dtype)
    n_in = a.ndim - 1
    r = a.shape[-1]
    if isinstance(mod, nn.Dense | nn.DenseGeneral):
        x2d, lead = _dense_2d(mod, x, n_in)
        y = _low_rank(x2d, a.reshape(-1, r), b.reshape(r, -1), s, prec)
        return y.reshape(*lead, *b.shape[1:])
    if isinstance(mod, nn.Einsum):
        xs, kin, kout, out = _einsum_parts(mod, args, kwargs, n_in)
        rl = _free_letter(xs + kin + kout + out)
        ell = "..." if "..." in xs else ""
        t_spec = ell + "".join(c for c in xs.replace("...", "") if c in out) + rl
        t = jnp.einsum(f"{xs},{kin}{rl}->{t_spec}", x, a, precision=prec) * s.astype(x.dtype)
        return jnp.einsum(f"{t_spec},{rl}{kout}->{out}", t, b, precision=prec)
    if isinstance(mod, nn.Conv):
        a_conv = mod.clone(parent=None, name=None, features=r, use_bias=False)
        t = a_conv.apply({"params": {"kernel": a}}, x) * s.astype(x.dtype)
        y = jnp.dot(t.reshape(-1, r), b.reshape(r, -1), precision=prec)
        return y.reshape(*t.shape[:-1], *b.shape[1:])
    raise TypeError(type(mod))  # pragma: no cover - _SUPPORTED is exhaustive


def _per_feature(mod: nn.Module, args: tuple, kwargs: dict, v: jax.Array, ndim: int,
                 n_in: int) -> jax.Array:
    """``v``, indexed by the kernel's output axes, shaped to broadcast over the layer's
    ``ndim``-axis output (Dense, DenseGeneral: the trailing axes; Einsum: where its output
    spec puts them)."""
    if not isinstance(mod, nn.Einsum):
        return v
    _, _, kout, out = _einsum_parts(mod, args, kwargs, n_in)
    pre, _, post = out.partition("...")
    sizes = dict(zip(kout, v.shape))
    order = [c for c in pre + post if c in sizes]
    v = jnp.transpose(v, [kout.index(c) for c in order])
    shape = [sizes[c] if c in sizes else 1 for c in pre]
    shape += [1] * (ndim - len(pre) - len(post)) + [sizes[c] if c in sizes else 1 for c in post]
    return v.reshape(shape)


# ----------------------------------------------------------------------------- adapter kinds


def _dora(mod: nn.Module, args: tuple, kwargs: dict, y, d, xd, kernel, a, b, s, m):
    """PEFT's DoRA forward: ``m / n * (x @ W + scale * x @ A @ B) + bias``, with ``n`` the
    norm of ``W + scale * A @ B`` per output feature, detached from the gradient (the DoRA
    paper's section 4.3, as PEFT). The norm is the only place ``W + scale * A @ B`` is
    formed; activations take the layer's own ``x @ W`` and the low-rank ``d``. With dropout
    on the adapter input, PEFT recomputes the base on the dropped input: ``y + (m / n - 1) *
    (dropout(x) @ W) + m / n * d``, and so does this."""
    n_in = a.ndim - 1
    n = jax.lax.stop_gradient(weight_norm(kernel, a, b, s))
    lay = lambda v: _per_feature(mod, args, kwargs, v.astype(y.dtype), y.ndim, n_in)  # noqa: E731
    f = lay(m / n)
    bias = lay(P.unbox(mod.get_variable("params", "bias"))) if mod.has_variable(
        "params", "bias") else jnp.zeros((), y.dtype)
    if xd is _input(args, kwargs):  # no dropout in this call: the layer's output serves
        return f * (y - bias + d) + bias
    return y + (f - 1) * _base(mod, args, kwargs, xd, kernel, n_in).astype(y.dtype) + f * d


def _interceptor(rate: float, consumed: set[str]) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        mod, method = context.module, context.method_name
        if method not in ("__call__", "attend") or not isinstance(mod, _SUPPORTED):
            return next_fun(*args, **kwargs)
        if method == "attend" and not isinstance(mod, nn.Embed):
            return next_fun(*args, **kwargs)
        param = "embedding" if isinstance(mod, nn.Embed) else "kernel"
        # the base's storage: an NF4 kernel (jlora.quant) is dequantized inside the matmul
        base = quantized_base(mod, method, args, kwargs) or functools.partial(
            next_fun, *args, **kwargs)
        if mod.scope is None or not mod.has_variable("params", param + P.A_SUFFIX):
            return base()
        path = ".".join(str(p) for p in mod.scope.path)
        aliases = _ALIASES.get()
        if aliases is None:
            consumed.add(path)
        else:
            consumed.update(f"{a}.{path}" if path else a for a in aliases)
        y = base()
        if mod.has_variable("params", param + P.MERGED_SUFFIX):
            return y
        get = lambda suffix: P.unbox(mod.get_variable("params", param + suffix))  # noqa: E731
        a, b, s = get(P.A_SUFFIX), get(P.B_SUFFIX), get(P.SCALE_SUFFIX)
        dora = mod.has_variable("params", param + P.MAGNITUDE_SUFFIX)
        if dora and isinstance(mod, nn.Embed | nn.Conv):
            raise LayoutError(f"{path}: DoRA adapts Dense, DenseGeneral and Einsum layers only, "
                              f"not {type(mod).__name__}; inject it with use_dora=False.")
        if isinstance(mod, nn.Embed):  # no dropout on embeddings, as PEFT
            return y + _embed_delta(mod, method, args, a, b, s).astype(y.dtype)
        xd = _dropout(mod, _input(args, kwargs), rate)
        d = _delta(mod, args, kwargs, xd, a, b, s).astype(y.dtype)
        if not dora:
            return y + d
        return _dora(mod, args, kwargs, y, d, xd, full(get("")), a, b, s,
                     get(P.MAGNITUDE_SUFFIX))

    return interceptor


def _read_copies(tree: Any) -> Any:
    """The tree with each trainable copy in its param's place (what the model reads)."""
    def fn(_, leaves):
        out = dict(leaves)
        for param in copy_params(leaves):
            fold_copy(out, param, True)
        return out

    return P.map_modules(tree, fn)


def lora(fn: Callable, *, dropout: float = 0.0, on_unconsumed: str = "merge",
         mode: str = "intercept") -> Callable:
    """Wraps ``fn(variables, *args, **kwargs)`` (e.g. ``model.apply``) to run the adapters.

    Args:
      fn: a function whose first argument is the (adapted) variables or params tree.
      dropout: dropout probability on the adapter input (PEFT's ``lora_dropout``; pass
        ``config.dropout``). Applied only when the call has a ``'dropout'`` rng
        (``rngs={'dropout': key}``), i.e. in training; embeddings get none, as in PEFT.
      on_unconsumed: ``'merge'`` (default): an adapter that no supported layer read is
        merged into its kernel and the call re-run; ``'raise'``: raise
        :class:`~jlora.errors.UnconsumedAdapterError`.
      mode: ``'intercept'`` (default) runs ``x @ A @ B`` inside linen layers; ``'merge'``
        merges every adapter on read and calls ``fn`` on the plain tree, for any JAX function
        of the params (forms ΔW, so meant for inference).

    Returns:
      A function with ``fn``'s signature. It checks, once per trace, that every adapter is
      whole and fits its kernel (:func:`jlora.paths.check_adapters`:
      :class:`~jlora.errors.IncompleteAdapterError` or :class:`~jlora.errors.ShapeError`).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jlora import LoraConfig, inject, merge
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 4))
      >>> p = inject(model.init(jax.random.key(0), x), LoraConfig(rank=2, targets=".*",
      ...            init="random"), jax.random.key(1))
      >>> y = lora(model.apply)(p, x)
      >>> bool(jnp.allclose(y, model.apply(merge(p), x), atol=1e-5))
      True
    """
    if mode not in ("intercept", "merge"):
        raise ConfigError(f"mode={mode!r}: choose 'intercept' or 'merge'.")
    if on_unconsumed not in ("merge", "raise"):
        raise ConfigError(f"on_unconsumed={on_unconsumed!r}: choose 'merge' or 'raise'.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} must be in [0, 1).")

    @functools.wraps(fn)
    def wrapped(variables, *args, **kwargs):
        # once per trace under jit: Python over the tree's paths
        adapters = P.check_adapters(P.params_of(variables), "lora")
        quantized = has_quantized(P.params_of(variables))  # NF4 kernels need the interceptor
        if not adapters and not (quantized and mode == "intercept"):
            return fn(dequantize(variables) if quantized else variables, *args, **kwargs)
        if mode == "merge":
            return fn(dequantize(merge(variables, unload=True)), *args, **kwargs)
        if any(ad.kind == "copy" and not ad.merged for ad in adapters.values()):
            variables = P.with_params(variables, _read_copies(P.params_of(variables)))
        consumed: set[str] = set()
        with nn.intercept_methods(_interceptor(dropout, consumed)):
            out = fn(variables, *args, **kwargs)
        missing = sorted({m for (m, _), ad in adapters.items()
                          if not ad.merged and ad.kind != "copy"} - consumed)
        if not missing:
            return out
        if on_unconsumed == "raise":
            raise UnconsumedAdapterError(
                f"no supported layer (Dense, DenseGeneral, Einsum, Conv, Embed) read the "
                f"adapters of {', '.join(m or '<root>' for m in missing)}; use "
                f"lora(fn, on_unconsumed='merge') to merge "
                "them on read, or target only supported layers.")
        partly = P.with_params(variables, fold_modules(P.params_of(variables), into=True,
                                                       only=set(missing)))
        with nn.intercept_methods(_interceptor(dropout, set())):
            return fn(partly, *args, **kwargs)

    return wrapped
