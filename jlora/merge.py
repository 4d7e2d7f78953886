"""merge / unmerge / delta: fold adapters into their kernels and back.

``merge`` keeps A and B (and marks the adapter merged, ``<param>_lora_merged`` in place of
``<param>_lora_scale``; DoRA keeps the weight norm it divided by, ``<param>_lora_norm``;
a trainable copy takes its param's place, the original kept as ``<param>_lora_original``)
so that ``unmerge`` can restore the tree; ``unload=True`` drops them for export.
``lora(fn)`` skips merged adapters, and plain ``model.apply`` ignores the extra leaves, so a
merged tree runs at zero overhead.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import jax.numpy as jnp

from jlora import paths as P
from jlora.quant.nf4 import full  # an NF4 kernel (jlora.quant) merges as its dequantized array


def delta_w(a: Any, b: Any, scale: Any, dtype: Any = None) -> Any:
    """``scale * (A @ B)`` with A's leading axes as inputs, in the kernel's layout.

    Example:
      >>> import jax.numpy as jnp
      >>> delta_w(jnp.ones((3, 2)), jnp.ones((2, 4)), 0.5).shape
      (3, 4)
    """
    a, b = P.unbox(a), P.unbox(b)
    d = jnp.tensordot(a, b, axes=1, precision="highest") * jnp.asarray(P.unbox(scale), a.dtype)
    return d if dtype is None else d.astype(dtype)


def _column_norm(v: Any, n_in: int) -> Any:
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(n_in))))


def weight_norm(kernel: Any, a: Any, b: Any, scale: Any) -> Any:
    """DoRA's ``||W + scale * A @ B||`` over the input axes: one norm per output feature.

    PEFT's ``get_weight_norm`` (the column norm of ``W + scale * B @ A`` in torch's (out, in)
    layout, GPT-2's Conv1D transposed first). The only place DoRA forms ``W + scale * A @ B``.

    Example:
      >>> import jax.numpy as jnp
      >>> weight_norm(jnp.ones((4, 3)), jnp.zeros((4, 2)), jnp.zeros((2, 3)), 1.0)
      Array([2., 2., 2.], dtype=float32)
    """
    w, d = full(P.unbox(kernel)), delta_w(a, b, scale)
    return _column_norm(w.astype(jnp.promote_types(w.dtype, d.dtype)) + d, P.unbox(a).ndim - 1)


def _rebox(leaf: Any, value: Any) -> Any:
    return leaf.replace_boxed(value) if P.is_box(leaf) else value


def _dora_weights(leaves: dict[str, Any], param: str, d: Any) -> tuple[Any, Any, Any]:
    """``(unmerged W, merged W, weight norm)`` of a DoRA adapter whose ``scale * A @ B`` is
    ``d``, in the promoted dtype: merged is ``m / n * (W + d)``."""
    w = full(P.unbox(leaves[param]))
    w = w.astype(jnp.promote_types(w.dtype, d.dtype))
    m = P.unbox(leaves[param + P.MAGNITUDE_SUFFIX])
    if param + P.NORM_SUFFIX in leaves:  # merged: the param holds m / n * (W + d)
        n = P.unbox(leaves[param + P.NORM_SUFFIX])
        return w * (n / m) - d, w, n
    n = _column_norm(w + d, P.unbox(leaves[param + P.A_SUFFIX]).ndim - 1)
    return w, (m / n) * (w + d), n


def _fold_adapter(out: dict[str, Any], param: str, into: bool) -> None:
    """Folds one LoRA or DoRA adapter into (or out of) ``out[param]``, in place in ``out``.

    LoRA: ``W +- scale * A @ B``. DoRA (PEFT's merge): ``W' = m / n * (W + scale * A @ B)``
    with ``n`` the weight norm, kept as ``<param>_lora_norm`` so that unmerge can divide by
    it; unmerge is ``W = W' * n / m - scale * A @ B``.
    """
    src, dst = (P.SCALE_SUFFIX, P.MERGED_SUFFIX) if into else (P.MERGED_SUFFIX, P.SCALE_SUFFIX)
    if param + src not in out:
        return  # already in the wanted state
    kernel = out[param]
    w = full(P.unbox(kernel))
    d = delta_w(out[param + P.A_SUFFIX], out[param + P.B_SUFFIX], out[param + src])
    if param + P.MAGNITUDE_SUFFIX not in out:
        new = w.astype(jnp.promote_types(w.dtype, d.dtype)) + (d if into else -d)
    else:
        before, after, n = _dora_weights(out, param, d)
        new = after if into else before
        mag = out[param + P.MAGNITUDE_SUFFIX]
        if into:
            out[param + P.NORM_SUFFIX] = _rebox(mag, n.astype(P.unbox(mag).dtype))
        else:
            del out[param + P.NORM_SUFFIX]
    out[param] = _rebox(kernel, new.astype(w.dtype))
    out[param + dst] = out.pop(param + src)


def fold_copy(out: dict[str, Any], param: str, into: bool) -> None:
    """Swaps a trainable copy into ``out[param]`` (keeping the original aside) or back."""
    src, dst = (P.SAVED_SUFFIX, P.ORIGINAL_SUFFIX) if into else (P.ORIGINAL_SUFFIX,
                                                                 P.SAVED_SUFFIX)
    if param + src in out:
        out[param], out[param + dst] = out.pop(param + src), out[param]


def copy_params(leaves: dict[str, Any]) -> list[str]:
    """Names of the params with a trainable copy among one module's leaves."""
    return sorted(n[: -len(s)] for n in leaves for s in (P.SAVED_SUFFIX, P.ORIGINAL_SUFFIX)
                  if n.endswith(s))


_ADAPTER_LEAVES = (P.A_SUFFIX, P.B_SUFFIX, P.MERGED_SUFFIX, P.MAGNITUDE_SUFFIX, P.NORM_SUFFIX)


def fold_modules(tree: Any, *, into: bool, unload: bool = False,
                 only: set[str] | None = None, names: Collection[str] | None = None) -> Any:
    """Folds adapters into (``into=True``) or out of their params, module by module.

    Folding in turns ``<param>_lora_scale`` into the ``<param>_lora_merged`` marker and swaps
    each trainable copy in (``<param>_lora_saved`` -> ``<param>``, the original kept as
    ``<param>_lora_original``), or, with ``unload``, drops every adapter leaf; folding out
    reverses it. ``only`` limits the work to some module paths, ``names`` to some adapters
    (folded in the order of :func:`jlora.paths.adapter_names`, out in the reverse order).
    Adapters already in the wanted state are left alone.
    """

    def fn(module, leaves):
        if only is not None and module not in only:
            return leaves
        out = dict(leaves)
        order = [n for n in P.views(leaves) if names is None or n in names]
        for name in order if into else order[::-1]:
            view = P.views(out)[name]
            for param in P.adapter_params(view):
                _fold_adapter(view, param, into)
                if unload:
                    for s in _ADAPTER_LEAVES:
                        view.pop(param + s, None)
            for param in copy_params(view):
                fold_copy(view, param, into)
                if unload:
                    view.pop(param + P.ORIGINAL_SUFFIX, None)
            out = P.unview(out, name, view)
        if unload:  # PEFT's merge_and_unload drops the adapters it did not merge too
            out = {k: v for k, v in out.items() if not P.is_adapter_name(k)}
        return out

    return P.map_modules(tree, fn)


def merge(params: Any, *, unload: bool = False, adapter: str | Sequence[str] | None = None,
          requantize: bool = False) -> Any:
    """Folds every adapter (or the named ones) into its kernel: ``W + scale * A @ B``.

    Args:
      params: an adapted tree (variables dict or bare params).
      unload: drop the adapter leaves (PEFT's ``merge_and_unload``: adapters not merged are
        dropped too); otherwise keep them, marked merged, so that :func:`unmerge` restores
        the tree.
      adapter: the adapter name(s) to merge (PEFT's ``adapter_names``); all by default.
      requantize: an adapted NF4 kernel (:func:`jlora.quantize`) merges as its dequantized
        kernel plus the update, in full precision; with ``requantize`` it is quantized again
        with its own settings (QLoRA's 4-bit merged model).

    Returns:
      The same kind of tree; ``model.apply(merge(p), x) == lora(model.apply)(p, x)``.

    Raises:
      NotInjectedError: the tree holds no adapters.
      IncompleteAdapterError: an adapter misses a leaf (so do :func:`unmerge`, :func:`delta`,
        :func:`jlora.lora`, :func:`jlora.split`... : see :func:`jlora.paths.check_adapters`).
      ShapeError: an adapter's A and B do not fit each other or the kernel.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> sorted(merge(p, unload=True)["q"])
      ['kernel']
    """
    tree = P.params_of(params)
    P.require_adapters(tree, "merge")
    names = P.require_names(tree, adapter, "merge")
    out = fold_modules(tree, into=True, unload=unload, names=names)
    if requantize:
        from jlora.quant.tree import requantize_like

        out = requantize_like(out, tree)
    return P.with_params(params, out)


def unmerge(params: Any, *, adapter: str | Sequence[str] | None = None) -> Any:
    """Takes merged adapters (all, or the named ones) back out of their kernels: the inverse
    of :func:`merge`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}},
      ...            LoraConfig(rank=2, targets=["q"], init="random"), jax.random.key(0))
      >>> back = unmerge(merge(p))
      >>> bool(jnp.allclose(back["q"]["kernel"], p["q"]["kernel"], atol=1e-6))
      True
    """
    tree = P.params_of(params)
    P.require_adapters(tree, "unmerge")
    names = P.require_names(tree, adapter, "unmerge")
    return P.with_params(params, fold_modules(tree, into=False, names=names))


def delta(params: Any) -> dict[str, Any]:
    """What :func:`merge` adds to each adapted param: ``{'<module>.<param>': change}``.

    ``scale * A @ B`` for LoRA; ``m / n * (W + scale * A @ B) - W`` for DoRA; the copy minus
    the original for a trainable copy (modules_to_save, bias modes). In the param's shape and
    dtype. A named adapter's key ends in ``@<name>`` (``'q.kernel@math'``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> {k: v.shape for k, v in delta(p).items()}
      {'q.kernel': (4, 6)}
    """
    tree = P.params_of(params)
    P.require_adapters(tree, "delta")
    out: dict[str, Any] = {}

    def fn(module, all_leaves):
        for adapter, leaves in P.views(all_leaves).items():
            key = lambda param, a=adapter: P.named(  # noqa: E731
                f"{module}.{param}" if module else param, a)
            for param in P.adapter_params(leaves):
                state = leaves.get(param + P.SCALE_SUFFIX, leaves.get(param + P.MERGED_SUFFIX))
                dtype = P.unbox(leaves[param]).dtype
                d = delta_w(leaves[param + P.A_SUFFIX], leaves[param + P.B_SUFFIX], state)
                if param + P.MAGNITUDE_SUFFIX in leaves:
                    before, after, _ = _dora_weights(leaves, param, d)
                    d = after - before
                out[key(param)] = d.astype(dtype)
            for param in copy_params(leaves):
                w = P.unbox(leaves[param])
                if param + P.SAVED_SUFFIX in leaves:
                    d = P.unbox(leaves[param + P.SAVED_SUFFIX]) - w
                else:
                    d = w - P.unbox(leaves[param + P.ORIGINAL_SUFFIX])
                out[key(param)] = d
        return all_leaves

    P.map_modules(tree, fn)
    return out
