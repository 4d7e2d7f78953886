"""The train-step factory: grads w.r.t. the adapters only, accumulation, NaN guard, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from jlora.errors import ConfigError, TrainingError
from jlora.optim import combine
from jlora.train import mesh as M
from jlora.train.loss import LossFn
from jlora.train.precision import Precision
from jlora.train.state import Shardings, TrainState


def _learning_rate(opt_state: Any, schedule: Callable | None, count: jax.Array) -> jax.Array:
    if schedule is not None:
        return jnp.asarray(schedule(count), jnp.float32) if callable(schedule) else \
            jnp.asarray(schedule, jnp.float32)
    is_hp = lambda x: isinstance(x, tuple) and hasattr(x, "hyperparams")  # noqa: E731
    found = [s.hyperparams["learning_rate"] for s in jax.tree.leaves(opt_state, is_leaf=is_hp)
             if is_hp(s) and "learning_rate" in s.hyperparams]
    return jnp.asarray(found[0], jnp.float32) if found else jnp.asarray(jnp.nan, jnp.float32)


def _global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves (float32), from one reduction per leaf."""
    total = jnp.float32(0.0)
    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.float32)
        total = total + jax.lax.reduce_sum(jax.lax.mul(x, x), tuple(range(x.ndim)))
    return jax.lax.sqrt(total)


class TrainStep:
    """A compiled train step: ``state, metrics = step(state, frozen, batch)``.

    Built by :func:`make_train_step`. The jitted function is :attr:`jitted` (explicit in/out
    shardings, the state donated); :attr:`trace_count` counts how often it was traced.
    Calling it checks the batch layout first and, with ``max_bad_steps``, raises
    :class:`~jlora.errors.TrainingError` after that many non-finite steps in a row.
    """

    def __init__(self, fn: Callable, shardings: Shardings, accum_steps: int,
                 max_bad_steps: int | None, donate: bool):
        self.shardings = shardings
        self.accum_steps = accum_steps
        self.max_bad_steps = max_bad_steps
        self.trace_count = 0
        replicated = NamedSharding(shardings.mesh, PS())

        def counted(*args):
            self.trace_count += 1
            return fn(*args)

        self.jitted = jax.jit(
            counted,
            in_shardings=(shardings.state, shardings.frozen, shardings.batch),
            out_shardings=(shardings.state, replicated),
            donate_argnums=(0,) if donate else (),
        )

    def lower(self, state: TrainState, frozen: Any, batch: Any):
        """``jax.jit(...).lower`` of the step (for ``.compile().memory_analysis()``)."""
        return self.jitted.lower(state, frozen, batch)

    def __call__(self, state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
        M.check_batch(batch, self.shardings.batch, self.accum_steps)
        state, metrics = self.jitted(state, frozen, batch)
        if self.max_bad_steps is not None and int(metrics["bad_streak"]) >= self.max_bad_steps:
            raise TrainingError(
                f"{int(metrics['bad_streak'])} train steps in a row had a non-finite loss or "
                f"gradients (max_bad_steps={self.max_bad_steps}); each was skipped with the "
                f"state untouched (step {int(state.step)}, {int(state.skipped)} skipped in "
                "all). Lower the learning rate, clip gradients (optax.clip_by_global_norm), "
                "use float32 compute, or check the data.")
        return state, metrics


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    shardings: Shardings,
    *,
    accum_steps: int = 1,
    precision: Precision | None = None,
    schedule: Callable[[jax.Array], jax.Array] | float | None = None,
    remat: bool | Callable = False,
    max_bad_steps: int | None = None,
    donate: bool = True,
) -> TrainStep:
    """Builds the jit-compiled train step over a mesh.

    The step differentiates only the adapters (the trainable half of :func:`jlora.split`);
    the frozen half is an argument (sharded per the rules, never donated, never
    differentiated). With ``accum_steps > 1`` the batch is cut into that many micro-batches
    (row ``i`` goes to micro-batch ``i % accum_steps``) and their gradients summed with
    ``lax.scan``, weighted by ``aux['tokens']`` when the loss reports it (the token mean of
    the whole batch) or equally. A step whose loss or gradients are not finite is skipped:
    the state is unchanged but ``bad_streak``/``skipped``.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)`` on the combined (adapted)
        params, e.g. :func:`jlora.train.causal_lm_loss`; ``aux`` is a dict (``tokens``
        optional).
      tx: the optimizer (the same one given to :func:`jlora.train.init`); clipping and
        schedules are optax's (``optax.chain(optax.clip_by_global_norm(1.0), ...)``).
      shardings: from :func:`jlora.train.init`.
      accum_steps: micro-batches per step.
      precision: the :class:`Precision` (adapters cast to its compute dtype in the forward).
      schedule: the learning-rate schedule (or a float) for the ``learning_rate`` metric,
        evaluated at the number of applied updates; default: read from an
        ``optax.inject_hyperparams`` state, else NaN.
      remat: ``True`` (or a ``jax.checkpoint`` policy) rematerialises the forward in the
        backward pass; per-block remat is a model option (jlora's llama:
        ``LlamaForCausalLM(..., remat=True)`` wraps each decoder block in ``nn.remat``).
      max_bad_steps: raise :class:`~jlora.errors.TrainingError` after this many non-finite
        steps in a row (None: never).
      donate: donate the state's buffers to the step.

    Returns:
      A :class:`TrainStep`; its metrics: ``loss``, ``grad_norm`` (before clipping),
      ``learning_rate``, ``tokens``, ``finite``, ``bad_streak``, ``skipped``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> from jlora.train import init, make_train_step
      >>> p = jlora.inject({"q": {"kernel": jnp.ones((4, 4))}},
      ...                  jlora.LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> loss_fn = lambda params, batch, rng: (jnp.mean(
      ...     (jlora.lora(lambda v, x: x @ v["q"]["kernel"], mode="merge")(params, batch["x"])
      ...      - 1.0) ** 2), {})
      >>> tx = optax.sgd(0.1)
      >>> state, frozen, sh = init(p, tx, jax.random.key(1))
      >>> step = make_train_step(loss_fn, tx, sh)
      >>> state, m = step(state, frozen, {"x": jnp.ones((2, 4))})
      >>> int(state.step), round(float(m["loss"]), 3), step.trace_count
      (1, 9.0, 1)
    """
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ConfigError(f"accum_steps={accum_steps!r} must be a positive int.")
    if max_bad_steps is not None and (not isinstance(max_bad_steps, int) or max_bad_steps < 1):
        raise ConfigError(f"max_bad_steps={max_bad_steps!r} must be a positive int or None.")
    precision = precision or Precision()
    param_sh = shardings.state.params
    data = M.batch_axes(shardings.mesh) or None
    reports_tokens = [False]

    def micro_loss(trainable, frozen, batch, rng):
        params = combine(precision.cast_compute(trainable), frozen)
        loss, aux = loss_fn(params, batch, rng)
        aux = dict(aux or {})
        weighted = "tokens" in aux
        reports_tokens[0] = weighted  # known at trace time
        weight = jnp.asarray(aux["tokens"], jnp.float32) if weighted else jnp.float32(1.0)
        loss = jnp.asarray(loss, jnp.float32)
        # one micro-batch: its own mean is the step's loss (no weighting, no division after)
        return (loss * weight if accum_steps > 1 else loss), (loss, weight)

    if remat:
        policy = None if remat is True else remat
        micro_loss = jax.checkpoint(micro_loss, policy=policy)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    one_device = shardings.mesh.size == 1

    def step(state: TrainState, frozen: Any, batch: Any):
        key = jax.random.wrap_key_data(state.rng)
        new_key, step_key = jax.random.split(key)
        rows = jax.tree.leaves(batch)[0].shape[0]
        if accum_steps == 1:
            (loss, (_, wsum)), grads = grad_fn(state.params, frozen, batch, step_key)
        else:
            def to_micro(x):
                x = x.reshape(rows // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
                spec = PS(None, data, *([None] * (x.ndim - 2)))
                return jax.lax.with_sharding_constraint(x, NamedSharding(shardings.mesh, spec))

            micro = jax.tree.map(to_micro, batch)

            def body(carry, xs):
                g_acc, l_acc, w_acc = carry
                mb, i = xs
                (wl, (_, w)), g = grad_fn(state.params, frozen, mb,
                                          jax.random.fold_in(step_key, i))
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                return (g_acc, l_acc + wl, w_acc + w), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
            (grads, wloss, wsum), _ = jax.lax.scan(
                body, init, (micro, jnp.arange(accum_steps)))
            denom = jnp.maximum(wsum, 1e-30)
            loss = wloss / denom
            # lax primitives per leaf (not jnp's jitted wrappers): tracing stays cheap with
            # many adapter leaves (a 32-layer model has hundreds)
            grads = jax.tree.map(lambda g: jax.lax.div(g, denom.astype(g.dtype)), grads)
        if not one_device:
            grads = jax.lax.with_sharding_constraint(grads, param_sh)
        grad_norm = _global_norm(grads)
        # a non-finite gradient leaf makes the norm non-finite: no separate pass over grads
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = _learning_rate(opt_state, schedule, state.step)  # the lr this update used
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            rng=jax.random.key_data(new_key))
        # one conditional for the whole state (not a select per leaf): the old state back
        # when the step was not finite
        out = jax.lax.cond(finite, lambda: new, lambda: state)
        bad = jnp.where(finite, 0, state.bad_streak + 1).astype(jnp.int32)
        out = out.replace(bad_streak=bad, skipped=state.skipped + (~finite).astype(jnp.int32))
        tokens = wsum if reports_tokens[0] else jnp.float32(rows)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
                   "tokens": tokens, "finite": finite, "bad_streak": bad,
                   "skipped": out.skipped}
        return out, metrics

    return TrainStep(step, shardings, accum_steps, max_bad_steps, donate)

