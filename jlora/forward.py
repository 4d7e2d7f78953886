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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import layer as L
from jlora import paths as P
from jlora.adapters import select
from jlora.errors import ConfigError, LayoutError, UnconsumedAdapterError
from jlora.merge import copy_params, fold_copy, fold_modules, merge
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
    return L.drop(mod.make_rng("dropout"), x, rate)


def _adapter_names_at(mod: nn.Module, param: str) -> list[str]:
    """The names of the adapters a bound module holds for ``param``, in adapter order."""
    leaves = mod.variables.get("params", {})
    return [n for n in P.views(leaves) if P.named(param + P.A_SUFFIX, n) in leaves]


def _interceptor(rate: float, consumed: set[str], routes=None) -> Callable:
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
        names = [] if mod.scope is None else _adapter_names_at(mod, param)
        if not names:
            return base()
        path = ".".join(str(p) for p in mod.scope.path)
        aliases = _ALIASES.get()
        if aliases is None:
            consumed.add(path)
        else:
            consumed.update(f"{a}.{path}" if path else a for a in aliases)
        y = base()
        get = lambda suffix, n: P.unbox(  # noqa: E731
            mod.get_variable("params", P.named(param + suffix, n)))
        live = [n for n in names if not mod.has_variable("params",
                                                          P.named(param + P.MERGED_SUFFIX, n))]
        dora = [n for n in live if mod.has_variable("params",
                                                    P.named(param + P.MAGNITUDE_SUFFIX, n))]
        if dora and isinstance(mod, nn.Embed | nn.Conv):
            raise LayoutError(f"{path}: DoRA adapts Dense, DenseGeneral and Einsum layers only, "
                              f"not {type(mod).__name__}; inject it with use_dora=False.")
        if routes is not None and live:
            if dora or len(live) < len(names):
                raise LayoutError(f"{path}: a mixed-adapter batch runs unmerged LoRA adapters "
                                  "only (here: DoRA or merged ones); unmerge them, or run "
                                  "one adapter at a time (adapter='name').")
            ids, order = routes
            local = [n if n in live else None for n in order]
            x = L.input_of(args, kwargs) if method == "attend" else args[0] if isinstance(
                mod, nn.Embed) else _dropout(mod, L.input_of(args, kwargs), rate)
            return y + L.mixed_delta(mod, path, method, x, (ids, local),
                                    get).astype(y.dtype)
        for n in live:  # PEFT's order: each adapter adds to what the previous ones gave
            a, b, s = get(P.A_SUFFIX, n), get(P.B_SUFFIX, n), get(P.SCALE_SUFFIX, n)
            if isinstance(mod, nn.Embed):  # no dropout on embeddings, as PEFT
                y = y + L.embed_delta(mod, method, args, a, b, s).astype(y.dtype)
                continue
            xd = _dropout(mod, L.input_of(args, kwargs), rate)
            d = L.delta(mod, args, kwargs, xd, a, b, s).astype(y.dtype)
            if n not in dora:
                y = y + d
            else:
                kernel = full(P.unbox(mod.get_variable("params", param)))
                bias = P.unbox(mod.get_variable("params", "bias")) if mod.has_variable(
                    "params", "bias") else None
                y = L.dora(mod, args, kwargs, y, d, None if xd is L.input_of(args, kwargs) else xd,
                          kernel, a, b, s, get(P.MAGNITUDE_SUFFIX, n), bias)
        return y

    return interceptor


def _read_copies(tree: Any) -> Any:
    """The tree with each trainable copy in its param's place (what the model reads)."""
    def fn(module, leaves):
        out = dict(leaves)
        owner: dict[str, str] = {}
        for name, view in P.views(leaves).items():
            for param in copy_params(view):
                if param in owner:
                    raise ConfigError(
                        f"{module}.{param}: adapters {owner[param]!r} and {name!r} both hold a "
                        "trainable copy of it (modules_to_save or a bias mode), and one call "
                        "can read only one; select one of them (adapter='name').")
                owner[param] = name
                fold_copy(view, param, True)
            out = P.unview(out, name, view)
        return out

    return P.map_modules(tree, fn)


ALL_ADAPTERS = object()  # lora(fn)'s default: every adapter in the tree runs


def _routes(adapter: Any, tree: Any) -> tuple[jax.Array, tuple[str, ...]]:
    """``(ids, adapter order)`` of a mixed batch, checked: one int per example, each in
    ``[-1, number of adapters)`` (checked where the indices are concrete)."""
    names = P.adapter_names(tree)
    ids = adapter if isinstance(adapter, jax.Array) else jnp.asarray(adapter)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ConfigError(f"adapter= as a mixed batch is an int array of shape (batch,) "
                          f"indexing {names}; got {ids.dtype} of shape {ids.shape}.")
    if not isinstance(ids, jax.core.Tracer):
        bad = [int(i) for i in jax.device_get(ids) if not -1 <= int(i) < len(names)]
        if bad:
            from jlora.errors import AdapterNameError

            raise AdapterNameError(
                f"mixed batch: adapter index {bad[0]} is out of range; indices pick from "
                f"{dict(enumerate(names))}, and -1 runs the base model alone.")
    return ids.astype(jnp.int32), names


def _from_nnx(fn: Any) -> bool:
    """An NNX graphdef or module, or an NNX forward: told by class module, so that linen
    users never import flax.nnx."""
    return hasattr(fn, "_jlora_graphdef") or any(
        c.__module__.startswith("flax.nnx") for c in type(fn).__mro__)


def check_options(dropout: float, on_unconsumed: str, mode: str) -> None:
    """:func:`lora`'s options (linen and NNX alike), or a ConfigError."""
    if mode not in ("intercept", "merge"):
        raise ConfigError(f"mode={mode!r}: choose 'intercept' or 'merge'.")
    if on_unconsumed not in ("merge", "raise"):
        raise ConfigError(f"on_unconsumed={on_unconsumed!r}: choose 'merge' or 'raise'.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} must be in [0, 1).")


def is_names(adapter: Any) -> bool:
    """Whether ``lora``'s ``adapter`` selects by name (a name, names or None), not per
    example (an index array)."""
    return adapter is None or isinstance(adapter, str) or (
        isinstance(adapter, tuple | list) and all(isinstance(a, str) for a in adapter))


def lora(fn: Callable, *, dropout: float = 0.0, on_unconsumed: str = "merge",
         mode: str = "intercept", adapter: Any = ALL_ADAPTERS) -> Callable:
    """Wraps ``fn(variables, *args, **kwargs)`` (e.g. ``model.apply``) to run the adapters.

    Args:
      fn: a function whose first argument is the (adapted) variables or params tree; or a
        Flax NNX ``graphdef`` (from ``nnx.split(model)``): then the result is the pure
        ``forward(state, *args, dropout_rng=None, **kwargs)`` of :mod:`jlora.nnx_forward`.
      dropout: dropout probability on the adapter input (PEFT's ``lora_dropout``; pass
        ``config.dropout``). Applied only when the call has a ``'dropout'`` rng
        (``rngs={'dropout': key}``), i.e. in training; embeddings get none, as in PEFT.
      on_unconsumed: ``'merge'`` (default): an adapter that no supported layer read is
        merged into its kernel and the call re-run; ``'raise'``: raise
        :class:`~jlora.errors.UnconsumedAdapterError`.
      mode: ``'intercept'`` (default) runs ``x @ A @ B`` inside linen layers; ``'merge'``
        merges every adapter on read and calls ``fn`` on the plain tree, for any JAX function
        of the params (forms ΔW, so meant for inference).
      adapter: which adapters run (default: every adapter in the tree). A name
        (``'math'``) or several (``('a', 'b')``, summed as PEFT's active adapters);
        ``None`` runs the base model alone (PEFT's ``disable_adapter``); an int array of shape
        ``(batch,)`` gives each example its own adapter, indexing
        :func:`jlora.adapter_names` (−1: the base model), in inference, generation and
        training, without forming ΔW (Dense, DenseGeneral and Embed layers; LoRA adapters).
        Adapters not selected are left out of the call; a merged one is taken out of its
        kernel for it.

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
    if _from_nnx(fn):  # Flax NNX: lora(graphdef) (jlora/nnx_forward.py)
        from jlora import nnx_forward

        return nnx_forward.lora(fn, dropout=dropout, on_unconsumed=on_unconsumed, mode=mode,
                                adapter=adapter)
    check_options(dropout, on_unconsumed, mode)

    @functools.wraps(fn)
    def wrapped(variables, *args, **kwargs):
        # once per trace under jit: Python over the tree's paths
        adapters = P.check_adapters(P.params_of(variables), "lora")
        routes = None
        if adapters and adapter is not ALL_ADAPTERS:
            if is_names(adapter):
                variables = select(variables, adapter)
                adapters = P.check_adapters(P.params_of(variables), "lora")
            else:
                routes = _routes(adapter, P.params_of(variables))
        quantized = has_quantized(P.params_of(variables))  # NF4 kernels need the interceptor
        if not adapters and not (quantized and mode == "intercept"):
            return fn(dequantize(variables) if quantized else variables, *args, **kwargs)
        if mode == "merge":
            if routes is not None:
                raise ConfigError("mode='merge' forms one merged kernel per call; a mixed-"
                                  "adapter batch needs mode='intercept'.")
            return fn(dequantize(merge(variables, unload=True)), *args, **kwargs)
        if any(ad.kind == "copy" and not ad.merged for ad in adapters.values()):
            if routes is not None:
                raise ConfigError("a mixed-adapter batch cannot read trainable copies "
                                  "(modules_to_save, bias modes): one call reads one copy; "
                                  "run those adapters one at a time (adapter='name').")
            variables = P.with_params(variables, _read_copies(P.params_of(variables)))
        consumed: set[str] = set()
        with nn.intercept_methods(_interceptor(dropout, consumed, routes)):
            out = fn(variables, *args, **kwargs)
        missing = sorted({m for (m, _, _), ad in adapters.items()
                          if not ad.merged and ad.kind != "copy"} - consumed)
        if not missing:
            return out
        if on_unconsumed == "raise" or routes is not None:
            raise UnconsumedAdapterError(
                f"no supported layer (Dense, DenseGeneral, Einsum, Conv, Embed) read the "
                f"adapters of {', '.join(m or '<root>' for m in missing)}; use "
                f"lora(fn, on_unconsumed='merge') to merge "
                "them on read, or target only supported layers.")
        partly = P.with_params(variables, fold_modules(P.params_of(variables), into=True,
                                                       only=set(missing)))
        with nn.intercept_methods(_interceptor(dropout, set(), routes)):
            return fn(partly, *args, **kwargs)

    return wrapped
