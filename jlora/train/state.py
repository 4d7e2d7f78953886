"""TrainState (adapters, optimizer state, step, rng, non-finite counters) and its sharded init."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jlora import paths as P
from jlora.errors import ConfigError
from jlora.inject import check_key
from jlora.optim import split
from jlora.train import mesh as M
from jlora.train.precision import Precision, to_fp32


class TrainState(NamedTuple):
    """Everything a LoRA run trains and must checkpoint, nothing frozen.

    Attributes:
      step: int32, the number of updates applied (skipped non-finite steps do not count).
      params: the trainable half of :func:`jlora.split` (adapter A/B leaves, float32; None
        where the frozen half holds a leaf).
      opt_state: the optimizer state for ``params``.
      rng: uint32 key data (``jax.random.key_data``) for dropout; advanced every applied step.
      bad_streak: int32, non-finite steps in a row (reset by a finite one).
      skipped: int32, non-finite steps skipped in total.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    bad_streak: jax.Array
    skipped: jax.Array

    def replace(self, **kw) -> TrainState:
        """A copy with some fields replaced."""
        return self._replace(**kw)


class Shardings(NamedTuple):
    """The layout of a sharded run, from :func:`init`.

    Attributes:
      mesh: the device mesh.
      state: a :class:`TrainState` of ``NamedSharding`` (None holes as in ``params``).
      frozen: ``NamedSharding`` of every frozen leaf (None holes where adapters are).
      batch: the sharding of a batch array (leading dim over the data axes).
    """

    mesh: Mesh
    state: TrainState
    frozen: Any
    batch: NamedSharding


def _opt_shardings(tx: optax.GradientTransformation, trainable: Any, param_sh: Any,
                   replicated: NamedSharding) -> Any:
    abstract = jax.eval_shape(tx.init, trainable)
    is_sh = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    try:
        out = optax.tree_map_params(tx, lambda _, s: s, abstract, param_sh,
                                    transform_non_params=lambda _: replicated, is_leaf=is_sh)
        # tree_map_params pairs leaves by param position; check every leaf got a sharding
        ok = jax.tree.all(jax.tree.map(lambda a, s: is_sh(s) and len(s.spec) <= a.ndim,
                                       abstract, out, is_leaf=lambda x: x is None))
        if ok:
            return out
    except (ValueError, TypeError):
        pass
    return jax.tree.map(lambda _: replicated, abstract)


def init(params: Any, tx: optax.GradientTransformation, key: jax.Array, *,
         mesh: Mesh | None = None, rules: Sequence[M.Rule] = M.DEFAULT_RULES,
         precision: Precision | None = None,
         train: str = "adapters", adapter: str | Sequence[str] | None = None
         ) -> tuple[TrainState, Any, Shardings]:
    """Splits an adapted tree, lays it out over a mesh and builds the initial state.

    With ``train="all"`` (full fine-tuning, the baseline LoRA is measured against) a plain
    tree without adapters trains every weight: the state holds all params (float32 master
    copy) and the frozen half is empty.

    Frozen params get their specs from ``rules``; adapters from their kernel's spec;
    optimizer state from its param's (scalars replicated). Works the same on one device
    (``mesh=None``: a 1x1x1 mesh) and across processes (every process passes the same
    ``params``; each keeps the shards of its devices).

    Args:
      params: the output of :func:`jlora.inject` (variables dict or bare tree, or an
        ``nnx.State``: carried as its pure dict, which ``jlora.lora(graphdef)`` takes).
      tx: the optimizer for the adapters (e.g. ``optax.adamw(1e-3)``, or
        ``jlora.optimizer(...)`` of it).
      key: a JAX PRNG key, the root of the dropout rngs.
      mesh: from :func:`make_mesh`; default one device.
      rules: partition rules (``(regex, PartitionSpec)``); :data:`DEFAULT_RULES` by default.
      precision: :class:`Precision` (default all float32).
      train: ``"adapters"`` (LoRA: the A/B leaves of :func:`jlora.split`) or ``"all"``
        (full fine-tuning of a tree without adapters).
      adapter: with ``train="adapters"``, train only this named adapter (or these); the
        others join the frozen half, unchanged. All adapters by default.

    Returns:
      ``(state, frozen, shardings)``: the :class:`TrainState`, the frozen half (cast and
      sharded; pass it to every step, never donated), and the :class:`Shardings`.

    Raises:
      MeshError: a rule naming an axis the mesh lacks.
      NotInjectedError: ``params`` holds no adapters.
      KeyTypeError: ``key`` is not a JAX PRNG key.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> p = jlora.inject({"q": {"kernel": jnp.ones((8, 4))}},
      ...                  jlora.LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> state, frozen, sh = init(p, optax.adam(1e-3), jax.random.key(1))
      >>> int(state.step), state.params["q"]["kernel_lora_a"].shape, frozen["q"]["kernel"].shape
      (0, (8, 2), (8, 4))
    """
    check_key(key)
    mesh = mesh or M.single_device_mesh()
    precision = precision or Precision()
    if P.is_nnx_state(params):  # Flax NNX: carried as its pure dict (jlora/nnx_tree.py)
        from jlora import nnx_tree

        params = nnx_tree.to_pure(params)
    params = jax.tree.map(P.unbox, params, is_leaf=P.is_leaf)
    shardings = M.named(mesh, M.param_specs(params, mesh, rules))
    if train == "all":
        _check_full(params)
        trainable, param_sh = params, shardings
        frozen = frozen_sh = jax.tree.map(lambda _: None, params)
    elif train == "adapters":
        P.require_adapters(P.params_of(params), "jlora.train.init")
        trainable, frozen = split(params, adapter=adapter)
        param_sh, frozen_sh = split(shardings, adapter=adapter)
    else:
        raise ConfigError(f"train={train!r}: choose 'adapters' (LoRA) or 'all' (full "
                          "fine-tuning).")
    replicated = NamedSharding(mesh, PS())
    trainable = M.put(to_fp32(trainable), param_sh)
    frozen = M.put(precision.cast_frozen(frozen), frozen_sh)
    opt_sh = _opt_shardings(tx, trainable, param_sh, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    scalar = lambda v: M.put(jnp.asarray(v, jnp.int32), replicated)  # noqa: E731
    state = TrainState(step=scalar(0), params=trainable, opt_state=opt_state,
                       rng=M.put(key, replicated), bad_streak=scalar(0), skipped=scalar(0))
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                          bad_streak=replicated, skipped=replicated)
    return state, frozen, Shardings(mesh, state_sh, frozen_sh, M.batch_sharding(mesh))


def _check_full(params: Any) -> None:
    if P.check_adapters(P.params_of(params), "jlora.train.init(train='all')"):
        raise ConfigError("train='all' fine-tunes every weight of a plain tree, but this one "
                          "holds adapters: fold them in with jlora.merge(params, unload=True) "
                          "first, or train them with train='adapters'.")
    ints = [p for p, x in P.leaves_with_paths(params)
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if ints:
        raise ConfigError(f"train='all' differentiates every leaf, but {ints[:3]} are not "
                          "floating point; keep such buffers outside the params.")


def abstract(state: TrainState, shardings: Shardings | None = None) -> TrainState:
    """The state as ``ShapeDtypeStruct``s carrying ``shardings.state`` (or each array's own
    sharding): a restore target, e.g. for another mesh.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> p = jlora.inject({"q": {"kernel": jnp.ones((8, 4))}},
      ...                  jlora.LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> state, _, sh = init(p, optax.sgd(0.1), jax.random.key(1))
      >>> abstract(state, sh).params["q"]["kernel_lora_a"].shape
      (8, 2)
    """
    sh = shardings.state if shardings is not None else jax.tree.map(lambda x: x.sharding, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, sh)
