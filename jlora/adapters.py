"""Named adapters: list, select, delete (PEFT's ``adapter_name``, ``set_adapter``,
``disable_adapter`` and ``delete_adapter`` as pure functions over the tree).

A tree holds any number of adapters. The adapter ``'default'`` uses the plain leaf names
(``kernel_lora_a``); another adapter ``name`` suffixes each of its leaves with ``@name``
(``kernel_lora_a@math``). :func:`jlora.inject` adds one (``name=``); :func:`jlora.lora` runs
all, some (``adapter=``), none (``adapter=None``) or one per example (``adapter=ids``).
Weighted combinations: :func:`jlora.add_weighted_adapter` (:mod:`jlora.weighted`).
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


def rename(params: Any, old: str, new: str) -> Any:
    """The tree with adapter ``old``'s leaves renamed to adapter ``new`` (how the PEFT
    exporter and importer move a named adapter to and from the ``'default'`` leaf names).

    Example:
      >>> rename({"q": {"kernel": 0, "kernel_lora_a@math": 1}}, "math", "default")
      {'q': {'kernel': 0, 'kernel_lora_a': 1}}
    """
    tree = P.params_of(params)
    P.require_names(tree, old, "rename")
    if new != old and new in P.adapter_names(tree):
        from jlora.errors import AlreadyInjectedError

        raise AlreadyInjectedError(f"rename: this tree already holds an adapter named {new!r}.")

    def fn(_, leaves):
        out = {}
        for k, v in leaves.items():
            if P.is_adapter_name(k) and P.parse_leaf(k)[1] == old:
                k = P.named(P.parse_leaf(k)[0], new)
            out[k] = v
        return out

    return P.with_params(params, P.map_modules(tree, fn))


def graft(params: Any, adapted: Any, name: str) -> Any:
    """``params`` plus the ``'default'`` adapter of ``adapted`` (the same model with one
    adapter, e.g. what :func:`jlora.hf.load_peft` built on the bare base) as adapter ``name``.
    The model's own params are taken from ``adapted`` (PiSSA/OLoRA rewrite kernels)."""
    moved = P.params_of(rename(adapted, P.DEFAULT_ADAPTER, name) if name != P.DEFAULT_ADAPTER
                        else adapted)
    new: dict[str, dict[str, Any]] = {}
    for path, leaf in P.leaves_with_paths(moved):
        module, k = P.split_path(path)
        new.setdefault(module, {})[k] = leaf

    def fn(module, leaves):
        mine = new.get(module, {})
        out = {k: mine.get(k, v) if not P.is_adapter_name(k) else v for k, v in leaves.items()}
        out.update({k: v for k, v in mine.items() if P.is_adapter_name(k)})
        return out

    return P.with_params(params, P.map_modules(P.params_of(params), fn))
