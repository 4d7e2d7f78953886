"""merge / unmerge / delta: fold adapters into their kernels and back.

``merge`` keeps A and B (and marks the adapter merged, ``<param>_lora_merged`` in place of
``<param>_lora_scale``) so that ``unmerge`` can restore the tree; ``unload=True`` drops them
for export. ``lora(fn)`` skips merged adapters, and plain ``model.apply`` ignores the extra
leaves, so a merged tree runs at zero overhead.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jlora import paths as P


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


def _fold(leaves: dict[str, Any], param: str, sign: float) -> Any:
    kernel = leaves[param]
    state = leaves.get(param + P.SCALE_SUFFIX, leaves.get(param + P.MERGED_SUFFIX))
    w = P.unbox(kernel)
    d = delta_w(leaves[param + P.A_SUFFIX], leaves[param + P.B_SUFFIX], state)
    new = (w.astype(jnp.promote_types(w.dtype, d.dtype)) + sign * d).astype(w.dtype)
    return kernel.replace_boxed(new) if P.is_box(kernel) else new


def fold_modules(tree: Any, *, into: bool, unload: bool = False,
                 only: set[str] | None = None) -> Any:
    """Folds adapters into (``into=True``) or out of their kernels, module by module.

    Folding in turns ``<param>_lora_scale`` into the ``<param>_lora_merged`` marker (or
    drops A, B and the marker with ``unload``); folding out reverses it. ``only`` limits the
    work to some module paths. Adapters already in the wanted state are left alone.
    """
    src, dst = (P.SCALE_SUFFIX, P.MERGED_SUFFIX) if into else (P.MERGED_SUFFIX, P.SCALE_SUFFIX)

    def fn(module, leaves):
        if only is not None and module not in only:
            return leaves
        out = dict(leaves)
        for param in P.adapter_params(leaves):
            if param + src in leaves:
                out[param] = _fold(leaves, param, +1.0 if into else -1.0)
                out[param + dst] = out.pop(param + src)
            if unload:
                for s in (P.A_SUFFIX, P.B_SUFFIX, P.MERGED_SUFFIX):
                    out.pop(param + s, None)
        return out

    return P.map_modules(tree, fn)


def merge(params: Any, *, unload: bool = False) -> Any:
    """Folds every active adapter into its kernel: ``W + scale * A @ B``.

    Args:
      params: an adapted tree (variables dict or bare params).
      unload: drop the adapter leaves (PEFT's ``merge_and_unload``); otherwise keep them,
        marked merged, so that :func:`unmerge` restores the tree.

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
    return P.with_params(params, fold_modules(tree, into=True, unload=unload))


def unmerge(params: Any) -> Any:
    """Takes merged adapters back out of their kernels: the inverse of :func:`merge`.

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
    return P.with_params(params, fold_modules(tree, into=False))


def delta(params: Any) -> dict[str, Any]:
    """``{'<module>.<param>': scale * A @ B}`` for every adapter, in the kernel's shape.

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

    def fn(module, leaves):
        for param in P.adapter_params(leaves):
            state = leaves.get(param + P.SCALE_SUFFIX, leaves.get(param + P.MERGED_SUFFIX))
            kernel = P.unbox(leaves[param])
            out[f"{module}.{param}" if module else param] = delta_w(
                leaves[param + P.A_SUFFIX], leaves[param + P.B_SUFFIX], state, kernel.dtype)
        return leaves

    P.map_modules(tree, fn)
    return out
