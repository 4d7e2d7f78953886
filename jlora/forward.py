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
from jlora.adapters import select
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
    return drop(mod.make_rng("dropout"), x, rate)


def drop(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """:func:`_dropout`'s masking from an explicit key (shared with the NNX forward)."""
    threshold = round(rate * 2**_DROP_BITS)
    if threshold == 0:
        return x
    # two 16-bit draws from each 32-bit word: half the threefry work of 16-bit bits
    words = jax.random.bits(key, ((x.size + 1) // 2,), jnp.uint32)
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


# ----------------------------------------------------------------------------- selection


def _adapter_names_at(mod: nn.Module, param: str) -> list[str]:
    """The names of the adapters a bound module holds for ``param``, in adapter order."""
    leaves = mod.variables.get("params", {})
    return [n for n in P.views(leaves) if P.named(param + P.A_SUFFIX, n) in leaves]


def _stack(leaves: list[jax.Array], axis: int) -> jax.Array:
    """Stacks adapters' A (rank last) or B (rank first) with their ranks zero-padded to the
    largest: a padded rank adds zeros, not error."""
    r = max(x.shape[axis] for x in leaves)
    pad = lambda x: jnp.pad(x, [(0, r - x.shape[axis]) if i == axis % x.ndim else (0, 0)  # noqa: E731
                                for i in range(x.ndim)])
    return jnp.stack([pad(x) for x in leaves])


def _mixed_delta(mod: nn.Module, method: str, args: tuple, kwargs: dict, x, routes, get):
    """The adapters' sum for a batch whose example ``i`` runs adapter ``route[i]`` (−1: none).

    Each example gathers its own A and B from the stacked adapters of this layer (ranks
    zero-padded to the largest) and runs ``(x_i @ A_i) * s_i @ B_i``: no ΔW, and per example
    only its adapter's low-rank FLOPs. ``routes`` is ``(ids, local)``: the batch's adapter
    indices and, for each index of the tree's adapter order, this layer's stack slot (−1
    where this layer has no such adapter)."""
    ids, local = routes
    names = [n for n in local if n is not None]
    if not isinstance(mod, nn.Dense | nn.DenseGeneral | nn.Embed):
        raise LayoutError(f"{'.'.join(map(str, mod.scope.path))}: a mixed-adapter batch runs "
                          f"Dense, DenseGeneral and Embed layers, not {type(mod).__name__}; "
                          "run this model's adapters one at a time (adapter='name').")
    batch = ids.shape[0]
    if x.ndim < 2 or x.shape[0] != batch:
        raise LayoutError(f"{'.'.join(map(str, mod.scope.path))}: a mixed-adapter batch of "
                          f"{batch} examples, but this layer's input has shape {x.shape}; the "
                          "adapter indices need one entry per example (the first axis).")
    slot = jnp.asarray([-1 if n is None else names.index(n) for n in local] + [-1], jnp.int32)
    idx = slot[jnp.where(ids < 0, len(local), ids)]
    pick = jnp.maximum(idx, 0)
    a = _stack([get(P.A_SUFFIX, n) for n in names], -1)
    b = _stack([get(P.B_SUFFIX, n) for n in names], 0)
    s = jnp.stack([get(P.SCALE_SUFFIX, n).astype(jnp.float32) for n in names])
    s_ex = jnp.where(idx >= 0, s[pick], 0.0)
    if isinstance(mod, nn.Embed) and method != "attend":  # x holds token ids
        a, b = promote_dtype(a, b, dtype=mod.dtype)
    else:
        x, a, b = promote_dtype(x, a, b, dtype=mod.dtype)
    s_ex = s_ex.astype(a.dtype)
    if isinstance(mod, nn.Embed):
        if method == "attend":  # q @ (A @ B).T per example
            t = jnp.einsum("bsf,brf->bsr", x.reshape(batch, -1, x.shape[-1]), b[pick])
            y = jnp.einsum("bsr,bvr->bsv", t * s_ex[:, None, None], a[pick])
            return y.reshape(*x.shape[:-1], a.shape[1])
        t = a[pick.reshape((batch,) + (1,) * (x.ndim - 1)), x]  # (batch, ..., r)
        t = t.reshape(batch, -1, t.shape[-1]) * s_ex[:, None, None]
        return jnp.einsum("btr,bro->bto", t, b[pick]).reshape(*x.shape, b.shape[-1])
    n_in = a.ndim - 2
    x2d, lead = _dense_2d(mod, x, n_in)
    if not lead or lead[0] != batch:
        raise LayoutError(f"{'.'.join(map(str, mod.scope.path))}: a mixed-adapter batch of "
                          f"{batch} examples, but this layer's input has leading shape "
                          f"{tuple(lead)}; the adapter indices need one entry per example "
                          "(the first axis).")
    r = a.shape[-1]
    x3 = x2d.reshape(batch, -1, x2d.shape[-1])
    t = jnp.einsum("bti,bir->btr", x3, a[pick].reshape(batch, -1, r)) * s_ex[:, None, None]
    y = jnp.einsum("btr,bro->bto", t, b[pick].reshape(batch, r, -1))
    return y.reshape(*lead, *b.shape[2:])


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
            x = _input(args, kwargs) if method == "attend" else args[0] if isinstance(
                mod, nn.Embed) else _dropout(mod, _input(args, kwargs), rate)
            return y + _mixed_delta(mod, method, args, kwargs, x, (ids, local),
                                    get).astype(y.dtype)
        for n in live:  # PEFT's order: each adapter adds to what the previous ones gave
            a, b, s = get(P.A_SUFFIX, n), get(P.B_SUFFIX, n), get(P.SCALE_SUFFIX, n)
            if isinstance(mod, nn.Embed):  # no dropout on embeddings, as PEFT
                y = y + _embed_delta(mod, method, args, a, b, s).astype(y.dtype)
                continue
            xd = _dropout(mod, _input(args, kwargs), rate)
            d = _delta(mod, args, kwargs, xd, a, b, s).astype(y.dtype)
            if n not in dora:
                y = y + d
            else:
                kernel = full(P.unbox(mod.get_variable("params", param)))
                y = _dora(mod, args, kwargs, y, d, xd, kernel, a, b, s, get(P.MAGNITUDE_SUFFIX, n))
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
    from jlora import nnx_forward  # Flax NNX: lora(graphdef) (jlora/nnx_forward.py)

    if nnx_forward.is_nnx(fn):
        return nnx_forward.lora(fn, dropout=dropout, on_unconsumed=on_unconsumed, mode=mode,
                                adapter=adapter)
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
        routes = None
        if adapters and adapter is not ALL_ADAPTERS:
            if adapter is None or isinstance(adapter, str) or (
                    isinstance(adapter, tuple | list) and all(isinstance(a, str) for a in adapter)):
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
