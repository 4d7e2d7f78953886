"""Named adapters: list, select, delete (PEFT's ``adapter_name``, ``set_adapter``,
``disable_adapter`` and ``delete_adapter`` as pure functions over the tree).

A tree holds any number of adapters. The adapter ``'default'`` uses the plain leaf names
(``kernel_lora_a``); another adapter ``name`` suffixes each of its leaves with ``@name``
(``kernel_lora_a@math``). :func:`jlora.inject` adds one (``name=``); :func:`jlora.lora` runs
all, some (``adapter=``), none (``adapter=None``) or one per example (``adapter=ids``).
Weighted combinations are in :mod:`jlora.combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jlora import paths as P
from jlora.merge import fold_modules


def adapter_names(params: Any) -> tuple[str, ...]:
    """The names of the adapters a tree holds: ``'default'`` first, then the others sorted.

    A mixed batch's indices (``jlora.lora(fn, adapter=ids)``) refer to this order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> p = inject(p, LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> p = inject(p, LoraConfig(rank=4, targets=["q"]), jax.random.key(1), name="math")
      >>> adapter_names(p)
      ('default', 'math')
    """
    return P.adapter_names(params)


def _drop(tree: Any, names: set[str]) -> Any:
    """The bare tree without the adapters ``names``; merged ones are unmerged first, so the
    model reads its kernels as they were before those adapters."""
    tree = fold_modules(tree, into=False, names=names)
    return P.map_modules(tree, lambda _, leaves: {
        k: v for k, v in leaves.items() if not (P.is_adapter_name(k)
                                                and P.parse_leaf(k)[1] in names)})


def select(params: Any, adapter: str | Sequence[str] | None) -> Any:
    """The tree with only the named adapters (``None``: none, the base model).

    Adapters left out are removed; a merged one is first taken out of its kernel, so the
    result computes the base plus the selected adapters, as PEFT's ``set_adapter`` (and
    ``disable_adapter`` for ``None``). :func:`jlora.lora` with ``adapter=`` does this for one
    call.

    Raises:
      AdapterNameError: a name the tree does not hold (the message lists those it does).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> p = inject(p, LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> p = inject(p, LoraConfig(rank=4, targets=["q"]), jax.random.key(1), name="math")
      >>> sorted(select(p, "math")["q"])
      ['kernel', 'kernel_lora_a@math', 'kernel_lora_b@math', 'kernel_lora_scale@math']
    """
    tree = P.params_of(params)
    keep = set(P.require_names(tree, adapter, "select") or ())
    drop = set(P.adapter_names(tree)) - keep
    return P.with_params(params, _drop(tree, drop) if drop else tree)


def delete_adapter(params: Any, name: str) -> Any:
    """The tree without adapter ``name`` (PEFT's ``delete_adapter``); if it was merged, it is
    first taken out of its kernels.

    Raises:
      AdapterNameError: the tree holds no adapter of that name (the message lists them).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> p = inject(p, LoraConfig(rank=2, targets=["q"]), jax.random.key(0), name="math")
      >>> sorted(delete_adapter(p, "math")["q"])
      ['kernel']
    """
    tree = P.params_of(params)
    (name,) = P.require_names(tree, (name,), "delete_adapter")
    return P.with_params(params, _drop(tree, {name}))
