"""jlora.train with an NNX model: the LoRA step's compiled FLOPs against full fine-tuning,
frozen leaves untouched, a sharded step equal to one device, checkpoints and resume."""

import tempfile

import jax
import numpy as np
import optax
import pytest
from _nnx_model import TinyLM, adapted
from flax import nnx

import jlora

CONFIG = jlora.LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.1)


def _flops(graphdef, params, train, data):
    tx = optax.adamw(1e-3)
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(2), train=train)
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(graphdef), tx, sh)
    return step.lower(state, frozen, data.batch(0)).compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_lora_step_flops_at_most_three_quarters_of_full_fine_tuning():
    model = TinyLM(vocab=128, d=128, layers=1)
    graphdef, base, state = adapted(model, CONFIG)
    data = jlora.train.SyntheticTokens(vocab_size=128, seq_len=32, batch_size=4)
    lora, full = _flops(graphdef, state, "adapters", data), _flops(graphdef, base, "all", data)
    print(f"nnx LoRA step FLOPs {lora:.4g} vs full fine-tuning {full:.4g}: {lora / full:.3f}x")
    assert lora <= 0.75 * full, (lora, full, lora / full)  # measured 0.63


def _train(mesh, state, graphdef, steps, restore_at=None):
    """Trains ``steps`` steps with a checkpoint after each; with ``restore_at``, restores that
    step's checkpoint (state and data position) after the last step and trains on to ``steps
    + (steps - restore_at)``: a resume. Returns the losses and the combined trained tree."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2))
    ts, frozen, sh = jlora.train.init(state, tx, jax.random.key(2), mesh=mesh)
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(graphdef, dropout=0.1), tx,
                                       sh, accum_steps=2)
    data = jlora.train.SyntheticTokens(vocab_size=32, seq_len=8, batch_size=8)
    ckpt = jlora.checkpoint.Checkpointer(tempfile.mkdtemp(), CONFIG, keep=steps)
    it = jlora.train.DataIterator(data)
    losses = []

    def run(ts, it, n):
        for _ in range(n):
            ts, metrics = step(ts, frozen, jlora.train.shard_batch(next(it), sh.batch,
                                                                   multiple=2))
            losses.append(float(metrics["loss"]))
            ckpt.save(int(ts.step), ts, data_position=it.position)
        return ts

    ts = run(ts, it, steps)
    if restore_at is not None:
        ckpt.wait()
        ts, position = ckpt.restore(jlora.train.abstract(ts, sh), step=restore_at)
        ts = run(ts, jlora.train.DataIterator(data, position), steps - restore_at)
    ckpt.close()
    assert step.trace_count == 1
    return losses, jlora.combine(ts.params, frozen)


@pytest.fixture(scope="module")
def lm():
    model = TinyLM(vocab=32, d=16, layers=2)
    return adapted(model, CONFIG)


@pytest.fixture(scope="module")
def one_device(lm):
    graphdef, _, state = lm
    return _train(jlora.train.single_device_mesh(), state, graphdef, 4)


def test_trains_with_frozen_leaves_bit_identical(lm, one_device):
    graphdef, _, state = lm
    losses, params = one_device
    assert losses[-1] < losses[0]
    pure = nnx.State.to_pure_dict(state)
    flat_before = dict(jlora.paths.leaves_with_paths(pure))
    changed = [p for p, v in jlora.paths.leaves_with_paths(params)
               if not np.array_equal(np.asarray(v), np.asarray(flat_before[p]))]
    assert changed and all(p.endswith(("_lora_a", "_lora_b")) for p in changed)
    # the trained tree runs through the NNX forward and merges into the graphdef's model
    ids = jax.numpy.arange(16).reshape(2, 8)
    y = jlora.lora(graphdef)(params, ids)
    merged = nnx.merge(graphdef, jlora.merge(params, unload=True))
    np.testing.assert_allclose(merged(ids), y, atol=1e-5)


@pytest.mark.slow
def test_sharded_step_matches_one_device_and_resumes(lm, one_device):
    graphdef, _, state = lm
    mesh = jlora.train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.size == 8
    # 4 steps, then back to the checkpoint of step 2 and its data position, 2 steps again
    losses, _ = _train(mesh, state, graphdef, 4, restore_at=2)
    np.testing.assert_allclose(losses[:4], one_device[0], rtol=1e-5)
    np.testing.assert_allclose(losses[4:], one_device[0][2:], rtol=1e-5)


class Stateful(nnx.Module):
    """Non-param state the step must carry untouched: batch stats and an rng stream."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.up = nnx.Linear(8, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.head = nnx.Linear(8, 16, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.head(self.drop(self.bn(self.up(self.embed(ids)))))


def test_non_param_state_rides_along_untouched():
    graphdef, state = nnx.split(Stateful(nnx.Rngs(0)))
    state = jlora.inject(state, jlora.LoraConfig(rank=2, targets=["up", "head"]),
                         jax.random.key(1))
    tx = optax.adam(1e-2)
    ts, frozen, sh = jlora.train.init(state, tx, jax.random.key(2))
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(graphdef, dropout=0.1), tx, sh)
    data = jlora.train.SyntheticTokens(vocab_size=16, seq_len=8, batch_size=4)
    for i in range(2):
        ts, metrics = step(ts, frozen, data.batch(i))
    assert np.isfinite(float(metrics["loss"]))
    assert frozen["drop"]["rngs"]["key"].dtype == state["drop"]["rngs"]["key"].get_value().dtype
    np.testing.assert_array_equal(frozen["bn"]["mean"], state["bn"]["mean"].get_value())
    np.testing.assert_array_equal(jax.random.key_data(frozen["drop"]["rngs"]["key"]),
                                  jax.random.key_data(state["drop"]["rngs"]["key"].get_value()))
    assert int(frozen["drop"]["rngs"]["count"]) == int(state["drop"]["rngs"]["count"].get_value())
