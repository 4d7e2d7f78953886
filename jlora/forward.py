"""lora(fn): run a linen model with its adapters, without forming ΔW.

``lora(model.apply)`` has ``model.apply``'s signature. Inside, linen's method interception
adds ``dropout(x) @ A @ B * scale`` beside every adapted ``Dense``, ``DenseGeneral``,
``Einsum``, ``Conv`` and ``Embed`` (``__call__`` and ``attend``). An adapter that no supported
layer reads is merged into its kernel for that call (or raises, with
``on_unconsumed='raise'``): never silently ignored. ``mode='merge'`` merges every adapter on
read, for any JAX function of the params.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jlora import paths as P
from jlora.errors import ConfigError, UnconsumedAdapterError
from jlora.merge import fold_modules, merge

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


def _dropout(mod: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if rate <= 0.0 or not mod.scope.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _free_letter(eq: str) -> str:
    return next(c for c in string.ascii_letters if c not in eq)


def _delta(mod: nn.Module, method: str, args: tuple, kwargs: dict, a, b, s, rate: float):
    prec = getattr(mod, "precision", None)
    if isinstance(mod, nn.Embed):
        if method == "attend":
            q, a, b = promote_dtype(args[0], a, b, dtype=mod.dtype)
            t = jnp.dot(q, b.T, precision=None)
            return jnp.dot(t, a.T, precision=None) * s.astype(t.dtype)
        ids = args[0]
        (a, b) = promote_dtype(a, b, dtype=mod.dtype)
        return jnp.dot(jnp.take(a, ids, axis=0), b, precision=None) * s.astype(a.dtype)
    x = args[0] if args else kwargs["inputs"]
    x = _dropout(mod, x, rate)
    x, a, b = promote_dtype(x, a, b, dtype=mod.dtype)
    n_in = a.ndim - 1
    if isinstance(mod, nn.Dense):
        t = jnp.dot(x, a, precision=prec)
    elif isinstance(mod, nn.DenseGeneral):
        axis = mod.axis if isinstance(mod.axis, tuple | list) else (mod.axis,)
        axis = tuple(ax % x.ndim for ax in axis)
        t = jax.lax.dot_general(x, a, ((axis, tuple(range(n_in))), ((), ())), precision=prec)
    elif isinstance(mod, nn.Einsum):
        eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or mod.einsum_str
        eq = eq.replace(" ", "")
        lhs, out = eq.split("->")
        xs, ks = lhs.split(",")
        r = _free_letter(eq)
        ell = "..." if "..." in xs else ""
        xs_plain = xs.replace("...", "")
        kin, kout = ks[:n_in], ks[n_in:]
        t_spec = ell + "".join(c for c in xs_plain if c in out) + r
        t = jnp.einsum(f"{xs},{kin}{r}->{t_spec}", x, a, precision=prec)
        return jnp.einsum(f"{t_spec},{r}{kout}->{out}", t, b, precision=prec) * s.astype(t.dtype)
    elif isinstance(mod, nn.Conv):
        a_conv = mod.clone(parent=None, name=None, features=a.shape[-1], use_bias=False)
        t = a_conv.apply({"params": {"kernel": a}}, x)
    else:  # pragma: no cover - _SUPPORTED is exhaustive
        raise TypeError(type(mod))
    return jnp.tensordot(t, b, axes=1, precision=prec) * s.astype(t.dtype)


def _interceptor(rate: float, consumed: set[str]) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        mod, method = context.module, context.method_name
        if method not in ("__call__", "attend") or not isinstance(mod, _SUPPORTED):
            return next_fun(*args, **kwargs)
        if method == "attend" and not isinstance(mod, nn.Embed):
            return next_fun(*args, **kwargs)
        param = "embedding" if isinstance(mod, nn.Embed) else "kernel"
        if mod.scope is None or not mod.has_variable("params", param + P.A_SUFFIX):
            return next_fun(*args, **kwargs)
        consumed.add(".".join(str(p) for p in mod.scope.path))
        y = next_fun(*args, **kwargs)
        if mod.has_variable("params", param + P.MERGED_SUFFIX):
            return y
        get = lambda suffix: P.unbox(mod.get_variable("params", param + suffix))  # noqa: E731
        d = _delta(mod, method, args, kwargs, get(P.A_SUFFIX), get(P.B_SUFFIX),
                   get(P.SCALE_SUFFIX), rate)
        return y + d.astype(y.dtype)

    return interceptor


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
        if not adapters:
            return fn(variables, *args, **kwargs)
        if mode == "merge":
            return fn(merge(variables, unload=True), *args, **kwargs)
        consumed: set[str] = set()
        with nn.intercept_methods(_interceptor(dropout, consumed)):
            out = fn(variables, *args, **kwargs)
        missing = sorted({m for (m, _), merged in adapters.items() if not merged} - consumed)
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
