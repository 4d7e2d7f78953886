"""Trainability: split / combine / labels, the optax optimizer over adapters only, summary."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from jlora import paths as P
from jlora.errors import ConfigError

TRAINABLE = "trainable"
TRAINABLE_B = "trainable_b"
FROZEN = "frozen"


def _leaf_labels(tree: Any, fn) -> Any:
    """Maps ``fn(leaf_name)`` over a tree's leaves (boxes whole); None stays None."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: fn(P.keypath_to_path(kp).rsplit(".", 1)[-1]), tree, is_leaf=P.is_leaf)


def labels(params: Any, *, lora_plus: bool = False,
           adapter: str | Sequence[str] | None = None) -> Any:
    """A pytree of ``'trainable'`` (adapter A and B, DoRA's magnitude, the trainable copies of
    modules_to_save and bias modes) / ``'frozen'`` (everything else), ready for
    ``optax.partition``. With ``lora_plus``, B leaves are ``'trainable_b'``. With
    ``adapter`` (a name or several), only those adapters train; the others are frozen.

    Collections other than ``'params'`` of a variables dict are frozen.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> labels(p)["q"]  # doctest: +NORMALIZE_WHITESPACE
      {'kernel': 'frozen', 'kernel_lora_a': 'trainable', 'kernel_lora_b': 'trainable',
       'kernel_lora_scale': 'frozen'}
    """
    return _labels(params, lora_plus=lora_plus, what="labels", adapter=adapter)


def _labels(params: Any, *, lora_plus: bool, what: str,
            adapter: str | Sequence[str] | None = None) -> Any:
    def label(name: str) -> str:
        if not P.is_trainable_name(name) or (
                names is not None and P.parse_leaf(name)[1] not in names):
            return FROZEN
        if lora_plus and P.parse_leaf(name)[0].endswith(P.B_SUFFIX):
            return TRAINABLE_B
        return TRAINABLE

    P.check_adapters(P.params_of(params), what)
    names = P.require_names(P.params_of(params), adapter, what)
    if P.is_nnx_state(params):  # Flax NNX: a State of labels (jlora/nnx_tree.py)
        from jlora import nnx_tree

        return nnx_tree.labels(params, _labels(nnx_tree.to_pure(params), lora_plus=lora_plus,
                                               what=what, adapter=adapter))
    if P.is_variables(params):
        out = {k: _leaf_labels(v, lambda _: FROZEN) for k, v in params.items() if k != "params"}
        out["params"] = _leaf_labels(params["params"], label)
        return type(params)(out) if not isinstance(params, dict) else out
    return _leaf_labels(params, label)


def split(params: Any, *, adapter: str | Sequence[str] | None = None) -> tuple[Any, Any]:
    """Splits a tree into ``(trainable, frozen)`` trees of the same structure, with ``None``
    where the other holds a leaf. Differentiate w.r.t. ``trainable`` only. With ``adapter``
    (a name or several), only those adapters are trainable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> trainable, frozen = split(p)
      >>> sorted(k for k, v in trainable["q"].items() if v is not None)
      ['kernel_lora_a', 'kernel_lora_b']
      >>> jax.tree.structure(combine(trainable, frozen)) == jax.tree.structure(p)
      True
    """
    lab = _labels(params, lora_plus=False, what="split", adapter=adapter)
    if P.is_nnx_state(params):  # Flax NNX: two States with None holes (jlora/nnx_tree.py)
        from jlora import nnx_tree

        return nnx_tree.split(params, lab)
    pick = lambda want: jax.tree.map(  # noqa: E731
        lambda lb, x: x if (lb != FROZEN) == want else None, lab, params)
    return pick(True), pick(False)


def combine(trainable: Any, frozen: Any) -> Any:
    """The inverse of :func:`split`: takes each leaf from whichever tree holds it.

    Example:
      >>> t, f = {"a": 1.0, "b": None}, {"a": None, "b": 2.0}
      >>> combine(t, f)
      {'a': 1.0, 'b': 2.0}
    """
    if P.is_nnx_state(trainable) and P.is_nnx_state(frozen):  # Flax NNX (jlora/nnx_tree.py)
        from jlora import nnx_tree

        out = nnx_tree.combine(trainable, frozen)
    else:
        out = jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                           is_leaf=lambda x: x is None or P.is_leaf(x))
    P.check_adapters(P.params_of(out), "combine")
    return out


def optimizer(tx: optax.GradientTransformation, params: Any, *,
              lora_plus_ratio: float | None = None,
              adapter: str | Sequence[str] | None = None) -> optax.GradientTransformation:
    """``optax.partition`` of ``tx`` over the adapters; frozen leaves get zero updates and
    keep no optimizer state.

    Works on the whole adapted tree (frozen gradients are ignored) or on the ``trainable``
    half of :func:`split`. ``optax.masked`` alone would not freeze: masked-out leaves pass
    their gradients through.

    Args:
      tx: the optimizer for adapters, e.g. ``optax.adamw(2e-4)``.
      params: the adapted tree (checked to hold adapters).
      lora_plus_ratio: LoRA+ (Hayou et al. 2024): B's updates are scaled by this ratio,
        i.e. B's learning rate is ``ratio * lr`` (A and B then keep separate optimizer state).
      adapter: train only this adapter (or these): the others are frozen like the base, keep
        no optimizer state and stay bit-identical. All adapters by default.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> tx = optimizer(optax.adam(1e-3), p)
      >>> state = tx.init(p)
      >>> grads = jax.tree.map(jnp.ones_like, p)
      >>> updates, state = tx.update(grads, state, p)
      >>> u = updates["q"]
      >>> float(abs(u["kernel"]).max()), round(float(u["kernel_lora_a"][0, 0]), 6)
      (0.0, -0.001)
    """
    P.require_adapters(P.params_of(params), "optimizer")
    P.require_names(P.params_of(params), adapter, "optimizer")
    transforms = {TRAINABLE: tx, FROZEN: optax.set_to_zero()}
    if lora_plus_ratio is not None:
        if isinstance(lora_plus_ratio, bool) or not isinstance(lora_plus_ratio, int | float) \
                or not math.isfinite(lora_plus_ratio) or lora_plus_ratio <= 0:
            raise ConfigError(f"lora_plus_ratio={lora_plus_ratio!r} must be a positive number "
                              "(the LoRA+ paper uses 16).")
        transforms[TRAINABLE_B] = optax.chain(tx, optax.scale(float(lora_plus_ratio)))
    return optax.partition(
        transforms, functools.partial(labels, lora_plus=lora_plus_ratio is not None,
                                      adapter=adapter))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Trainable and total parameter counts; ``str()`` is PEFT's print_trainable_parameters.

    Example:
      >>> s = Summary(trainable=10, total=1000)
      >>> s.percent
      1.0
    """

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")


def summary(params: Any) -> Summary:
    """Counts trainable (adapter) and total parameters of an adapted tree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import LoraConfig, inject
      >>> p = inject({"q": {"kernel": jnp.ones((4, 6))}}, LoraConfig(rank=2, targets=["q"]),
      ...            jax.random.key(0))
      >>> print(summary(p))
      trainable params: 20 || all params: 44 || trainable%: 45.4545
    """
    P.check_adapters(P.params_of(params), "summary")
    trainable = total = 0
    for path, leaf in P.leaves_with_paths(P.params_of(params)):
        name = path.rsplit(".", 1)[-1]
        if name.endswith((P.SCALE_SUFFIX, P.MERGED_SUFFIX, P.NORM_SUFFIX)):
            continue  # bookkeeping (scales, a merged DoRA's norm), not parameters
        n = int(np.size(P.unbox(leaf)))
        total += n
        trainable += n if P.is_trainable_name(name) else 0
    return Summary(trainable, total)
