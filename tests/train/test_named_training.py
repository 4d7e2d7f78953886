"""Named adapters in jlora.train: train one adapter on 8 devices while the others stay
bit-identical, a mixed-adapter batch trains each example's adapter, and the checkpoint of a
named adapter round-trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _jtrain_util import CONFIG, TinyLM, data, make_params

import jlora
import jlora.train as T
from jlora.checkpoint import Checkpointer

TX = optax.adam(1e-2)


def _two():
    model, p = make_params()
    second = jlora.LoraConfig(rank=2, alpha=4, targets=["k_proj", "v_proj", "down_proj"],
                              init="random")
    return model, jlora.inject(p, second, jax.random.key(5), name="b")


def _named_leaves(tree, name):
    return {jax.tree_util.keystr(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if str(kp[-1].key).endswith(f"@{name}")}


def test_train_one_named_adapter_on_a_mesh_and_checkpoint_it(tmp_path):
    model, p = _two()
    mesh = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, frozen, sh = T.init(p, TX, jax.random.key(0), mesh=mesh, adapter="b")
    assert _named_leaves(state.params, "b") and not any(
        x is not None for x in jax.tree.leaves(_named_leaves(state.params, "default")))
    # each leaf of 'b' takes the sharding the default adapter's same leaf takes
    specs = T.param_specs(p, mesh)["params"]["layer_0"]["down_proj"]
    for role in ("kernel_lora_a", "kernel_lora_b", "kernel_lora_scale"):
        assert specs[role + "@b"] == specs[role], role
    assert any(specs["kernel_lora_b@b"])  # sharded, not replicated
    step = T.make_train_step(T.causal_lm_loss(model.apply, adapter="b"), TX, sh)
    losses = []
    for i in range(4):
        state, metrics = step(state, frozen, T.shard_batch(data(8).batch(i), sh.batch))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = jlora.combine(state.params, frozen)
    before, after = jax.tree_util.tree_flatten_with_path(p)[0], dict(
        jax.tree_util.tree_flatten_with_path(trained)[0])
    for kp, x in before:
        if str(kp[-1].key).endswith(("_lora_a@b", "_lora_b@b")):
            assert not np.array_equal(after[kp], x)
        else:  # the base and the default adapter: bit-identical
            np.testing.assert_array_equal(after[kp], x)
    with Checkpointer(tmp_path, CONFIG) as ckpt:
        ckpt.save(4, state)
        ckpt.wait()
        back, _ = ckpt.restore(T.abstract(state, sh))
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)


def test_mixed_batch_trains_each_examples_adapter():
    model, p = _two()
    state, frozen, sh = T.init(p, TX, jax.random.key(0))
    step = T.make_train_step(T.causal_lm_loss(model.apply), TX, sh)
    batch = dict(data(8).batch(0))
    batch["adapter_ids"] = np.array([1, 1, -1, 1, 1, -1, 1, 1], np.int32)  # never 'default'
    state, metrics = step(state, frozen, T.shard_batch(batch, sh.batch))
    assert np.isfinite(float(metrics["loss"]))
    trained = jlora.combine(state.params, frozen)
    for kp, x in jax.tree_util.tree_flatten_with_path(p)[0]:
        now = dict(jax.tree_util.tree_flatten_with_path(trained)[0])[kp]
        if str(kp[-1].key).endswith(("_lora_a@b", "_lora_b@b")):
            assert not np.array_equal(now, x)
        else:  # Adam moves no leaf whose gradient is zero
            np.testing.assert_array_equal(now, x)
    # the loss of the mixed batch is the mean of each example under its own adapter
    ids = jnp.asarray(batch["input_ids"])
    per = {a: jlora.lora(model.apply, adapter=s)(p, ids, attention_mask=batch["attention_mask"])
           for a, s in ((1, "b"), (-1, None))}
    mixed = jlora.lora(model.apply, adapter=jnp.asarray(batch["adapter_ids"]))(
        p, ids, attention_mask=batch["attention_mask"])
    for i, a in enumerate(batch["adapter_ids"]):
        np.testing.assert_allclose(mixed[i], per[int(a)][i], atol=1e-5)
    assert isinstance(model, TinyLM)
