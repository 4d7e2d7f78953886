"""Flax NNX states through the tree functions: an ``nnx.State`` in, the same kind out.

One boundary, not a second implementation: every tree function reads a bare params tree
through :func:`jlora.paths.params_of` and writes it back through
:func:`jlora.paths.with_params`. For an ``nnx.State`` (from ``nnx.split(model)`` or
``nnx.state(model, nnx.Param)``) these call :func:`params_of` and :func:`with_params` here:
the params tree is the nested dict of the State's ``nnx.Param`` values (raw arrays, at the
State's own keys, so module paths are the State's paths joined with ``.``), and writing it
back keeps each Variable's type and metadata, wraps each new adapter leaf in an
``nnx.Param`` whose ``out_sharding`` derives from its kernel's (A takes the kernel's input
axes, B its output axes, as linen boxes do), and leaves every other Variable (RNG counts and
keys, batch stats, caches) untouched.

The training code works on :func:`to_pure` of a State: the nested dict of every Variable's
value (``nnx.State.to_pure_dict`` plus adapters), which ``nnx.merge(graphdef, tree)`` and
``jlora.lora(graphdef)`` both accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jlora import paths as P

_Keys = tuple[Any, ...]


def is_state(tree: Any) -> bool:
    """True for an ``nnx.State``."""
    return isinstance(tree, nnx.State)


def _flat(state: nnx.State) -> list[tuple[_Keys, Any]]:
    return [(tuple(k), v) for k, v in nnx.to_flat_state(state)]


def _value(v: Any) -> Any:
    return v.get_value() if isinstance(v, nnx.Variable) else v


def _is_param(v: Any) -> bool:
    return isinstance(v, nnx.Param) or not isinstance(v, nnx.Variable)


def _nest(items: list[tuple[_Keys, Any]]) -> dict:
    out: dict = {}
    for keys, value in items:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def _unnest(tree: Any) -> list[tuple[_Keys, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or P.is_box(x))
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp), leaf)
            for kp, leaf in flat]


def params_of(state: nnx.State) -> dict:
    """The params tree of a State: its ``nnx.Param`` values as a nested dict.

    Example:
      >>> from flax import nnx
      >>> _, state = nnx.split(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> sorted(params_of(state)), sorted(to_pure(state))
      (['bias', 'scale'], ['bias', 'mean', 'scale', 'var'])
    """
    return _nest([(k, _value(v)) for k, v in _flat(state) if _is_param(v)])


def to_pure(state: nnx.State) -> dict:
    """Every Variable's value as a nested dict (params, adapters and the rest): what the
    training code carries and ``nnx.merge(graphdef, tree)`` accepts."""
    return _nest([(k, _value(v)) for k, v in _flat(state)])


def _derived_sharding(names: Any, name: str, shape: tuple[int, ...],
                      kernel_shape: tuple[int, ...]) -> Any:
    """The ``out_sharding`` of adapter leaf ``name`` from its kernel's (None: replicated)."""
    if not names:
        return names
    names = tuple(names) + (None,) * (len(kernel_shape) - len(names))
    if name.endswith(P.A_SUFFIX):
        return (*names[:len(shape) - 1], None)
    if name.endswith(P.B_SUFFIX):
        return (None, *names[len(kernel_shape) - (len(shape) - 1):])
    if name.endswith((P.SCALE_SUFFIX, P.MERGED_SUFFIX)):
        return ()
    if name.endswith((P.MAGNITUDE_SUFFIX, P.NORM_SUFFIX)):
        return names[len(kernel_shape) - len(shape):]
    return names  # a trainable copy: its param's own


def _new_param(keys: _Keys, value: Any, old: dict[_Keys, Any]) -> nnx.Param:
    """An ``nnx.Param`` for a leaf the State did not have (an adapter), with the metadata of
    the param it adapts."""
    base = old.get((*keys[:-1], P.base_name(str(keys[-1]))))
    meta = dict(base.get_metadata()) if isinstance(base, nnx.Variable) else {}
    if "out_sharding" in meta:
        kshape = tuple(getattr(_value(base), "shape", ()))
        meta["out_sharding"] = _derived_sharding(meta["out_sharding"], str(keys[-1]),
                                                 tuple(getattr(value, "shape", ())), kshape)
    return nnx.Param.from_metadata(value, meta)


def with_params(state: nnx.State, params: Any) -> nnx.State:
    """``state`` with its params replaced by the tree ``params`` (see :func:`params_of`):
    kept leaves keep their Variable's type and metadata, new ones become ``nnx.Param``, params
    the tree no longer has are dropped; other Variables are kept as they are."""
    old = dict(_flat(state))
    out = {k: v for k, v in old.items() if not _is_param(v)}
    for keys, value in _unnest(params):
        var = old.get(keys)
        if isinstance(var, nnx.Variable):
            out[keys] = type(var).from_metadata(value, dict(var.get_metadata()))
        elif var is not None or value is None:
            out[keys] = value
        else:
            out[keys] = _new_param(keys, value, old)
    return nnx.State.from_flat_path(out)


def like(state: nnx.State, pure: Any) -> nnx.State:
    """A State of ``state``'s structure holding, at each Variable, the leaf of ``pure`` (a
    tree of :func:`to_pure`'s structure: labels, PartitionSpecs...)."""
    values = dict(_unnest(pure))
    return nnx.State.from_flat_path({k: values[k] for k, _ in _flat(state)})


# ----------------------------------------------------------------------- trainability


def labels(state: nnx.State, label_tree: Any) -> nnx.State:
    """The labels of :func:`jlora.labels` (computed on :func:`to_pure`) as a State; a
    Variable that is not an ``nnx.Param`` is frozen."""
    from jlora.optim import FROZEN

    out = like(state, label_tree)
    flat = {k: (lb if _is_param(v) else FROZEN)
            for (k, v), (_, lb) in zip(_flat(state), nnx.to_flat_state(out))}
    return nnx.State.from_flat_path(flat)


def split(state: nnx.State, label_state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(trainable, frozen)``: States of ``state``'s structure, each with ``None`` where
    the other holds a Variable (as :func:`jlora.split` of a linen tree)."""
    from jlora.optim import FROZEN

    lab = {tuple(k): v for k, v in nnx.to_flat_state(label_state)}
    flat = _flat(state)
    pick = lambda want: nnx.State.from_flat_path(  # noqa: E731
        {k: v if v is not None and (lab[k] != FROZEN) == want else None for k, v in flat})
    return pick(True), pick(False)


def combine(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    """The inverse of :func:`split`: each Variable from whichever State holds it."""
    out = dict(_flat(frozen))
    out.update((k, v) for k, v in _flat(trainable) if v is not None or k not in out)
    return nnx.State.from_flat_path(out)


# ----------------------------------------------------------------------------- layout


def layout(model: nnx.Module):
    """:func:`jlora.layout` of an nnx module: each adaptable layer's kind and input axes, read
    from the layers' own attributes (no trace, no example input)."""
    from jlora.layout import LayerInfo, Layout, _einsum_split

    infos: dict[str, LayerInfo] = {}
    for path, mod in nnx.iter_modules(model):
        where = ".".join(str(p) for p in path)
        if isinstance(mod, nnx.Embed):
            infos[where] = LayerInfo("embed", 1)
        elif isinstance(mod, nnx.Linear):
            infos[where] = LayerInfo("dense", 1)
        elif isinstance(mod, nnx.LinearGeneral):
            why = "LinearGeneral with batch_axis" if mod.batch_axis else None
            infos[where] = LayerInfo("dense_general", len(mod.axis), why)
        elif isinstance(mod, nnx.Einsum):  # the constructor's einsum_str (nnx requires one)
            n_in, why = _einsum_split(mod.einsum_str, len(mod.kernel_shape))
            infos[where] = LayerInfo("einsum", n_in, why)
        elif isinstance(mod, nnx.ConvTranspose):
            infos[where] = LayerInfo("conv", 0, "ConvTranspose is not supported")
        elif isinstance(mod, nnx.Conv):
            why = None
            if mod.feature_group_count != 1:
                why = "grouped convolution (feature_group_count > 1)"
            elif mod.mask is not None:
                why = "masked convolution (mask)"
            infos[where] = LayerInfo("conv", len(mod.kernel_shape) - 1, why)
    return Layout(infos)


def check_pure(tree: Any, what: str) -> None:
    """A forward's state must be an ``nnx.State`` or its pure dict."""
    if not isinstance(tree, Mapping):
        from jlora.errors import NnxStateError

        raise NnxStateError(f"{what}: the state is a {type(tree).__name__}; pass the nnx.State "
                            "of nnx.split(model) (adapted by jlora.inject), or its pure dict.")
