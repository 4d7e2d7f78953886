"""The train step: accumulation, NaN guard, precision policy, remat, donation, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jtrain_util import TinyLM, data, make_params, rel

import jlora
import jlora.train as T
from jlora.errors import TrainingError

SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 10)
TX = optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE)


def _train(model, params, *, accum=1, steps=3, precision=None, remat=False, mesh=None):
    state, frozen, sh = T.init(params, TX, jax.random.key(0), mesh=mesh, precision=precision)
    step = T.make_train_step(T.causal_lm_loss(model.apply), TX, sh, accum_steps=accum,
                             precision=precision, remat=remat)
    first, out = state, []
    for i in range(steps):
        state, m = step(state, frozen, T.shard_batch(data().batch(i), sh.batch, multiple=accum))
        out.append(m)
    return out, state, frozen, first


@pytest.fixture(scope="module")
def ref():
    """One device, fp32, no accumulation: 3 steps."""
    model, params = make_params()
    return (model, params, *_train(model, params))


def test_only_adapters_train_and_metrics(ref):
    model, params, ms, state, frozen, first = ref
    trainable, frozen0 = jlora.split(params)
    # frozen half bit-identical and alive (never donated); the state's buffers were donated
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.leaves(first.params)[0].is_deleted()
    assert rel(state.params, trainable) > 1e-4 and int(state.step) == 3
    assert [float(m["learning_rate"]) for m in ms] == pytest.approx(
        [float(SCHEDULE(i)) for i in range(3)])
    batch = data().batch(0)
    assert int(ms[0]["tokens"]) == int(batch["attention_mask"][:, 1:].sum())
    loss_fn = T.causal_lm_loss(model.apply)
    loss, g = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(jlora.combine(t, frozen0), batch, None)[0]))(trainable)
    assert float(ms[0]["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(ms[0]["grad_norm"]) == pytest.approx(float(optax.tree.norm(g)), rel=1e-5)


def test_accumulation_equals_one_big_batch(ref):
    model, params, ms, state, *_ = ref
    four, s4, *_ = _train(model, params, accum=4)
    for a, b in zip(four, ms):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(b["loss"]))
        assert float(a["tokens"]) == float(b["tokens"])
    assert rel(s4.params, state.params) <= 1e-5


def test_remat_gives_same_training(ref):
    model, params, ms, state, *_ = ref
    blocks, s1, *_ = _train(TinyLM(remat=True), params)
    whole, s2, *_ = _train(model, params, remat=True)
    assert rel(s1.params, state.params) <= 1e-5 and rel(s2.params, state.params) <= 1e-5
    for run in (blocks, whole):
        assert [float(m["loss"]) for m in run] == pytest.approx(
            [float(m["loss"]) for m in ms], rel=1e-5)


def test_bf16_policy(ref):
    _, params, ms, *_ = ref
    prec = T.Precision.bf16()
    bf, state, frozen, _ = _train(TinyLM(dtype=jnp.bfloat16), params, precision=prec)
    q = frozen["params"]["layer_0"]["q_proj"]
    assert q["kernel"].dtype == jnp.bfloat16 and q["kernel_lora_scale"].dtype == jnp.float32
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    for a, b in zip(bf, ms):
        assert abs(float(a["loss"]) - float(b["loss"])) < 0.02 * float(b["loss"])


def test_nonfinite_steps_are_skipped_then_stop():
    model, params = make_params()
    tx = optax.adam(1e-2)
    base = T.causal_lm_loss(model.apply)

    def loss_fn(p, batch, rng):
        loss, aux = base(p, batch, rng)
        return loss * batch["scale"][0], aux

    state, frozen, sh = T.init(params, tx, jax.random.key(0))
    step = T.make_train_step(loss_fn, tx, sh, max_bad_steps=3, donate=False)

    def batch(i, scale):
        b = {**data().batch(i), "scale": np.full((8,), scale, np.float32)}
        return T.shard_batch(b, sh.batch)

    state, m = step(state, frozen, batch(0, 1.0))
    assert bool(m["finite"])
    before = state
    for k, bad in enumerate([np.nan, np.inf]):
        state, m = step(state, frozen, batch(1, bad))
        assert not bool(m["finite"]) and int(m["bad_streak"]) == k + 1
        now = (state.params, state.opt_state, state.step, state.rng)
        then = (before.params, before.opt_state, before.step, before.rng)
        for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(then)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.skipped) == 2
    state, m = step(state, frozen, batch(2, 1.0))  # a finite step resets the streak
    assert bool(m["finite"]) and int(state.bad_streak) == 0 and int(state.step) == 2
    for _ in range(2):
        state, _ = step(state, frozen, batch(3, np.nan))
    with pytest.raises(TrainingError, match=r"3 train steps in a row.*non-finite"):
        step(state, frozen, batch(3, np.nan))
    assert step.trace_count == 1


def test_init_rejects_a_tree_without_adapters_and_a_bad_key():
    import jax.numpy as jnp

    from jlora.errors import KeyTypeError, NotInjectedError

    base = {"q": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(NotInjectedError, match="inject"):
        T.init(base, optax.sgd(0.1), jax.random.key(0))
    p = jlora.inject(base, jlora.LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
    with pytest.raises(KeyTypeError, match=r"jax.random.key\(0\)"):
        T.init(p, optax.sgd(0.1), 0)


def test_full_fine_tuning_trains_every_weight_and_refuses_adapters():
    import pytest

    from jlora.errors import ConfigError

    params = {"params": {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 2))}}}
    tx = optax.sgd(0.1)
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(0), train="all")
    assert jax.tree.leaves(frozen) == []

    def loss_fn(p, batch, rng):
        y = batch["x"] @ p["params"]["a"]["kernel"] @ p["params"]["b"]["kernel"]
        return jnp.mean(y ** 2), {}

    step = jlora.train.make_train_step(loss_fn, tx, sh)
    state, _ = step(state, frozen, {"x": jnp.ones((8, 4))})
    assert all(bool(jnp.all(x != 1.0)) for x in jax.tree.leaves(state.params))
    adapted = jlora.inject(params, jlora.LoraConfig(rank=2, targets=["a"]), jax.random.key(1))
    with pytest.raises(ConfigError, match="holds adapters"):
        jlora.train.init(adapted, tx, jax.random.key(0), train="all")
    with pytest.raises(ConfigError, match="not floating point"):
        jlora.train.init({"n": jnp.ones(3, jnp.int32), **params}, tx, jax.random.key(0),
                         train="all")
    with pytest.raises(ConfigError, match="train='some'"):
        jlora.train.init(params, tx, jax.random.key(0), train="some")
