"""lora(graphdef): run a Flax NNX model with its adapters, without forming ΔW.

``forward = jlora.lora(graphdef)`` is the pure function ``forward(state, *args,
dropout_rng=None, **kwargs)``: it builds the model with ``nnx.merge(graphdef, base)`` from
the state's non-adapter leaves, calls it, and returns what the model returns. Every adapted
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` and ``nnx.Embed``
(``__call__`` and ``attend``) of that fresh instance adds ``dropout(x) @ A @ B * scale`` to
its own output: for the call only, the instance's class is a subclass whose methods look
their adapter up in a context variable keyed by the instance (so nothing outlives the call,
and concurrent calls or traces do not see each other's adapters). The geometry and low-rank
math are :mod:`jlora.forward`'s, shared with the linen interceptor.

DoRA adapters run as :func:`jlora.layer.dora` does (the weight norm is the only place
``W + scale * A @ B`` is formed). As with linen, an adapter that no supported layer reads
(an unsupported module, one the call never reaches) is merged into its kernel for that call,
or raises with ``on_unconsumed='raise'``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from jlora import forward as F
from jlora import layer as L
from jlora import nnx_tree
from jlora import paths as P
from jlora.adapters import select
from jlora.errors import (
    ConfigError,
    KeyTypeError,
    LayoutError,
    NnxStateError,
    UnconsumedAdapterError,
)
from jlora.merge import fold_modules

_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
L.add_layer_kinds(dense=nnx.Linear, dense_general=nnx.LinearGeneral, einsum=nnx.Einsum,
                  embed=nnx.Embed)


class _Adapter(NamedTuple):
    path: str
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    key: jax.Array | None  # the dropout key of this layer (None: no dropout)
    rate: float
    magnitude: jax.Array | None = None  # DoRA's (None: plain LoRA)
    name: str = P.DEFAULT_ADAPTER


class _Call(NamedTuple):
    adapters: dict[int, list[_Adapter]]  # id(module instance) -> its adapters, in name order
    consumed: set[str]
    routes: tuple[jax.Array, tuple[str, ...]] | None = None  # a mixed batch: (ids, names)


_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("jlora_nnx_call",
                                                                       default=None)


def _lookup(mod: nnx.Module) -> list[_Adapter]:
    call = _ACTIVE.get()
    ads = [] if call is None else call.adapters.get(id(mod), [])
    if ads:
        call.consumed.add(ads[0].path)
    return ads


def _conv(mod: nnx.Conv) -> Callable:
    """``conv(x, a)``: the layer's own convolution with A as its kernel (r output features)."""
    def conv(x, a):
        layer = nnx.Conv(mod.in_features, a.shape[-1], mod.kernel_size, strides=mod.strides,
                         padding=mod.padding, input_dilation=mod.input_dilation,
                         kernel_dilation=mod.kernel_dilation, use_bias=False, dtype=mod.dtype,
                         param_dtype=a.dtype, precision=mod.precision,
                         kernel_init=lambda *_: a, rngs=nnx.Rngs(0))
        return layer(x)

    return conv


def _mixed(mod: nnx.Module, method: str, x: jax.Array, ads: list[_Adapter]) -> jax.Array:
    """A mixed batch through this layer's adapters (:func:`jlora.layer.mixed_delta`)."""
    ids, order = _ACTIVE.get().routes
    if any(ad.magnitude is not None for ad in ads):
        raise LayoutError(f"{ads[0].path}: a mixed-adapter batch runs LoRA adapters only (here: "
                          "DoRA); run one adapter at a time (adapter='name').")
    by_name = {ad.name: ad for ad in ads}
    roles = {P.A_SUFFIX: "a", P.B_SUFFIX: "b", P.SCALE_SUFFIX: "scale"}
    get = lambda role, n: getattr(by_name[n], roles[role])  # noqa: E731
    local = [n if n in by_name else None for n in order]
    return L.mixed_delta(mod, ads[0].path, method, x, (ids, local), get)


def _call(self, *args, **kwargs):
    base = type(self).__mro__[1]
    y = base.__call__(self, *args, **kwargs)
    ads = _lookup(self)
    if ads and _ACTIVE.get().routes is not None:
        x = L.input_of(args, kwargs)
        if not isinstance(self, nnx.Embed) and ads[0].key is not None:
            x = L.drop(ads[0].key, x, ads[0].rate)
        return y + _mixed(self, "__call__", x, ads).astype(y.dtype)
    for ad in ads:  # PEFT's order: each adds to what the previous ones gave
        if isinstance(self, nnx.Embed):  # no dropout on embeddings, as PEFT
            ids = (L.input_of(args, kwargs),)
            y = y + L.embed_delta(self, "__call__", ids, ad.a, ad.b, ad.scale).astype(y.dtype)
            continue
        x = L.input_of(args, kwargs)
        xd = x if ad.key is None else L.drop(ad.key, x, ad.rate)
        conv = _conv(self) if isinstance(self, nnx.Conv) else None
        d = L.delta(self, args, kwargs, xd, ad.a, ad.b, ad.scale, conv).astype(y.dtype)
        if ad.magnitude is None:
            y = y + d
        else:
            bias = None if self.bias is None else self.bias[...]
            y = L.dora(self, args, kwargs, y, d, xd if ad.key is not None else None,
                        self.kernel[...], ad.a, ad.b, ad.scale, ad.magnitude, bias)
    return y


def _attend(self, *args, **kwargs):
    y = type(self).__mro__[1].attend(self, *args, **kwargs)
    query = (args[0] if args else kwargs["query"],)
    ads = _lookup(self)
    if ads and _ACTIVE.get().routes is not None:
        return y + _mixed(self, "attend", query[0], ads).astype(y.dtype)
    for ad in ads:
        y = y + L.embed_delta(self, "attend", query, ad.a, ad.b, ad.scale).astype(y.dtype)
    return y


_SUBCLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    """One subclass per layer class (made once): ``__call__`` (and Embed's ``attend``) add the
    adapter of the instance when the current call has one."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        ns = {"__call__": _call, "__module__": __name__, "__qualname__": f"Lora{cls.__name__}"}
        if issubclass(cls, nnx.Embed):
            ns["attend"] = _attend
        sub = _SUBCLASSES[cls] = type(f"Lora{cls.__name__}", (cls,), ns)
    return sub


# ------------------------------------------------------------------------------ the forward


def _paths(tree: Any) -> set[str]:
    return {p for p, _ in P.leaves_with_paths(tree)}


def _build(graphdef: nnx.GraphDef, base: dict) -> nnx.Module:
    """``nnx.merge(graphdef, base)``, or an :class:`NnxStateError` if they do not belong
    together (other leaves, other paths)."""
    fix = ("pass the graphdef that nnx.split returned with this state "
           "(graphdef, state = nnx.split(model); jlora.lora(graphdef)(state, ...)), or the "
           "whole state when the graphdef was split off with all of it.")
    try:
        model = nnx.merge(graphdef, base)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise NnxStateError(f"jlora.lora(graphdef): the state does not belong to this graphdef "
                            f"({e}); {fix}") from None
    want = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model))}
    have = _paths(base)
    if want != have:
        odd = sorted(have - want)[:3] + sorted(want - have)[:3]
        raise NnxStateError(f"jlora.lora(graphdef): the state's paths differ from the graphdef's "
                            f"(e.g. {', '.join(odd)}); {fix}")
    return model


def _strip(tree: Any) -> Any:
    """The tree without adapter leaves: what the graphdef was split with."""
    return P.map_modules(tree, lambda _, ls: {k: v for k, v in ls.items()
                                              if not P.is_adapter_name(str(k))})


def _run(graphdef, tree, rate, rng, args, kwargs, routes=None):
    """Calls the model built from ``tree`` with its unmerged LoRA adapters; returns
    ``(output, module paths whose adapter no layer read)``."""
    adapters = P.check_adapters(tree, "lora")
    model = _build(graphdef, _strip(tree))
    leaves: dict[str, dict[str, Any]] = {}
    for path, leaf in P.leaves_with_paths(tree):
        module, name = P.split_path(path)
        leaves.setdefault(module, {})[name] = leaf
    want: dict[str, tuple[str, list[str]]] = {}
    for (m, param, name), ad in adapters.items():
        if not ad.merged and ad.kind in ("lora", "dora"):
            want.setdefault(m, (param, []))[1].append(name)
    table: dict[int, list[_Adapter]] = {}
    for i, (path, mod) in enumerate(nnx.iter_modules(model)):
        module = ".".join(map(str, path))
        param, names = want.get(module, (None, []))
        if param is None or not isinstance(mod, _SUPPORTED):
            continue
        if param != ("embedding" if isinstance(mod, nnx.Embed) else "kernel"):
            continue
        ls = leaves[module]
        key = None if rng is None or rate <= 0 else jax.random.fold_in(rng, i)
        table[id(mod)] = []
        for j, name in enumerate(sorted(names, key=P.adapter_names_order)):
            get = lambda role, n=name, ls=ls, p=param: ls.get(P.named(p + role, n))  # noqa: E731
            magnitude = get(P.MAGNITUDE_SUFFIX)
            if magnitude is not None and isinstance(mod, nnx.Embed | nnx.Conv):
                raise LayoutError(f"{module}: DoRA adapts Linear, LinearGeneral and Einsum "
                                  f"layers only, not {type(mod).__name__}; inject it with "
                                  "use_dora=False.")
            k = None if key is None else jax.random.fold_in(key, j) if j else key
            table[id(mod)].append(_Adapter(module, get(P.A_SUFFIX), get(P.B_SUFFIX),
                                           get(P.SCALE_SUFFIX), k, rate, magnitude, name))
        object.__setattr__(mod, "__class__", _adapted_class(type(mod)))
    call = _Call(table, set(), routes)
    token = _ACTIVE.set(call)
    try:
        out = model(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    return out, sorted(set(want) - call.consumed)


def lora(graphdef: Any, *, dropout: float = 0.0, on_unconsumed: str = "merge",
         mode: str = "intercept", adapter: Any = F.ALL_ADAPTERS) -> Callable:
    """:func:`jlora.lora` for a Flax NNX ``graphdef``: ``forward(state, *args,
    dropout_rng=None, **kwargs)`` returns what the model returns.

    ``state`` is the (adapted) ``nnx.State`` of ``nnx.split(model)`` or its pure dict (as
    :mod:`jlora.train` carries it). ``dropout_rng``, a JAX key, turns on the adapters'
    dropout (each adapted layer folds in its own index); it is not passed to the model.
    ``adapter`` selects named adapters as for linen (a name, several, or ``None`` for the
    base model; an int array of shape (batch,): one adapter per example, a mixed batch).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from flax import nnx
      >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> state = jlora.inject(state, jlora.LoraConfig(rank=2, targets=".*", init="random"),
      ...                      jax.random.key(1))
      >>> forward = jlora.lora(graphdef, dropout=0.1)
      >>> x = jnp.ones((2, 4))
      >>> y = forward(state, x)
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, jlora.merge(state, unload=True))(x),
      ...                   atol=1e-5))
      True
      >>> forward(state, x, dropout_rng=jax.random.key(2)).shape
      (2, 3)
    """
    if isinstance(graphdef, nnx.Module):
        raise ConfigError("jlora.lora got an nnx.Module; pass its graphdef: graphdef, state = "
                          "nnx.split(model); forward = jlora.lora(graphdef); "
                          "forward(state, *args).")
    graphdef = getattr(graphdef, "_jlora_graphdef", graphdef)
    F.check_options(dropout, on_unconsumed, mode)
    names = F.is_names(adapter)

    def forward(state: Any, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any):
        tree = nnx_tree.to_pure(state) if nnx_tree.is_state(state) else state
        nnx_tree.check_pure(tree, "jlora.lora(graphdef)")
        if dropout_rng is not None and not (
                isinstance(dropout_rng, jax.Array)
                and jax.dtypes.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key)):
            raise KeyTypeError("dropout_rng must be a JAX PRNG key (jax.random.key(0)), got "
                               f"{type(dropout_rng).__name__}.")
        routes = None
        if adapter is not F.ALL_ADAPTERS and names:
            tree = select(tree, adapter)
        elif adapter is not F.ALL_ADAPTERS:
            routes = F._routes(adapter, tree)
        adapters = P.check_adapters(tree, "lora")  # once per trace under jit
        if routes is not None and (mode == "merge" or any(
                ad.merged or ad.kind == "copy" for ad in adapters.values())):
            raise ConfigError("a mixed-adapter batch runs unmerged LoRA adapters with "
                              "mode='intercept' (no merged adapters, no trainable copies); run "
                              "one adapter at a time (adapter='name').")
        if mode == "merge" and adapters:
            tree, adapters = fold_modules(tree, into=True), {}  # forms ΔW: for inference
        if any(ad.kind == "copy" and not ad.merged for ad in adapters.values()):
            tree = F._read_copies(tree)
        out, missing = _run(graphdef, tree, dropout, dropout_rng, args, kwargs, routes)
        if not missing:
            return out
        if on_unconsumed == "raise" or routes is not None:
            raise UnconsumedAdapterError(
                f"no supported nnx layer (Linear, LinearGeneral, Einsum, Conv, Embed) read the "
                f"adapters of {', '.join(m or '<root>' for m in missing)}; use "
                "lora(graphdef, on_unconsumed='merge') to merge them on read, or target only "
                "supported layers.")
        tree = fold_modules(tree, into=True, only=set(missing))
        return _run(graphdef, tree, dropout, dropout_rng, args, kwargs)[0]

    forward._jlora_graphdef = graphdef  # lora(forward, dropout=...) rebuilds from it
    forward._jlora_nnx = True
    forward.__doc__ = lora.__doc__
    return forward

