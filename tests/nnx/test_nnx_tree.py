"""The tree functions on an nnx.State: the same kind out, the State's paths as module paths,
sharding metadata carried to the adapters, non-param state untouched, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _nnx_model import TARGETS, TinyLM, adapted, perturb_b
from flax import nnx

import jlora
from jlora.errors import LayoutError, TargetError

CONFIG = jlora.LoraConfig(rank=2, alpha=4, targets=TARGETS)


class Sharded(nnx.Module):
    """Params with sharding metadata, and non-param state (batch stats, an rng stream)."""

    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"),
                                     eager_sharding=False)
        self.blocks = nnx.List([nnx.Linear(4, 6, kernel_init=init, rngs=rngs)
                                for _ in range(2)])
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def _flat(state):
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def test_inject_returns_a_state_with_param_adapters_at_the_states_paths():
    graphdef, base, state = adapted(TinyLM(), CONFIG)
    assert isinstance(state, nnx.State)
    flat = _flat(state)
    for leaf in ("kernel_lora_a", "kernel_lora_b", "kernel_lora_scale"):
        assert isinstance(flat[f"blocks.0.up.{leaf}"], nnx.Param)
    assert flat["blocks.1.attn.qkv.kernel_lora_a"].get_value().shape == (16, 2)
    assert flat["blocks.1.attn.qkv.kernel_lora_b"].get_value().shape == (2, 3, 2, 8)
    assert flat["embed.embedding_lora_b"].get_value().shape == (2, 16)
    p = jlora.plan(base, CONFIG, layout=jlora.layout(nnx.merge(graphdef, base)))
    assert [e.module for e in p][:3] == ["blocks.0.attn.out", "blocks.0.attn.qkv", "blocks.0.down"]
    # the same plan as on the pure params dict
    pure = nnx.State.to_pure_dict(base)
    assert p == jlora.plan(pure, CONFIG, layout=jlora.layout(nnx.merge(graphdef, base)))
    assert str(jlora.summary(state)) == str(jlora.summary(jlora.inject(
        pure, CONFIG, jax.random.key(1), layout=jlora.layout(nnx.merge(graphdef, base)))))


def test_sharding_metadata_carries_to_the_adapters_and_other_state_passes_through():
    graphdef, state = nnx.split(Sharded(nnx.Rngs(0)))
    out = jlora.inject(state, jlora.LoraConfig(rank=2, targets=["blocks.0", "blocks.1"]),
                       jax.random.key(1))
    flat, before = _flat(out), _flat(state)
    assert flat["blocks.0.kernel_lora_a"].get_metadata()["out_sharding"] == ("fsdp", None)
    assert flat["blocks.0.kernel_lora_b"].get_metadata()["out_sharding"] == (None, "tensor")
    assert flat["blocks.0.kernel_lora_scale"].get_metadata()["out_sharding"] == ()
    assert flat["blocks.0.kernel"].get_metadata() == before["blocks.0.kernel"].get_metadata()
    others = [p for p, v in before.items() if not isinstance(v, nnx.Param)]
    assert {"bn.mean", "bn.var", "drop.rngs.count", "drop.rngs.key"} <= set(others)
    for tree in (out, jlora.merge(out), jlora.unmerge(jlora.merge(out)),
                 jlora.merge(out, unload=True)):
        flat = _flat(tree)
        for p in others:
            assert type(flat[p]) is type(before[p])
            assert flat[p].get_value() is before[p].get_value()
    assert jax.tree.structure(jlora.merge(out, unload=True)) == jax.tree.structure(state)
    model = nnx.merge(graphdef, jlora.merge(out, unload=True))  # runs as the base model did
    assert isinstance(model.bn, nnx.BatchNorm)
    # the sharding rules take the State too: a State of PartitionSpecs
    mesh = jlora.train.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    specs = jlora.train.param_specs(out, mesh)
    assert isinstance(specs, nnx.State)
    assert specs["blocks"][0]["kernel_lora_a"] == jax.sharding.PartitionSpec("fsdp", None)


def test_unmerge_restores_and_delta_names_state_paths():
    _, _, state = adapted(TinyLM(), CONFIG)
    state = perturb_b(state)
    back = jlora.unmerge(jlora.merge(state))
    for (p, a), (q, b) in zip(nnx.to_flat_state(back), nnx.to_flat_state(state)):
        assert p == q and type(a) is type(b)
        np.testing.assert_allclose(a.get_value(), b.get_value(), atol=1e-5)
    assert "blocks.0.attn.qkv.kernel" in jlora.delta(state)


def test_split_combine_labels_optimizer_on_states():
    _, _, state = adapted(TinyLM(), CONFIG)
    trainable, frozen = jlora.split(state)
    assert isinstance(trainable, nnx.State) and isinstance(frozen, nnx.State)
    names = {str(k[-1]) for k, v in nnx.to_flat_state(trainable) if v is not None}
    assert names == {"kernel_lora_a", "kernel_lora_b", "embedding_lora_a", "embedding_lora_b"}
    assert {k for k, v in nnx.to_flat_state(frozen) if v is None} == {
        k for k, v in nnx.to_flat_state(trainable) if v is not None}
    assert jax.tree.structure(jlora.combine(trainable, frozen)) == jax.tree.structure(state)
    # the optimizer takes the trainable half too, and keeps state for adapters only
    half = jlora.optimizer(optax.adam(1e-2), trainable)
    assert len(jax.tree.leaves(half.init(trainable))) == 2 * len(jax.tree.leaves(trainable)) + 1
    labels = jlora.labels(state, lora_plus=True)
    assert labels["blocks"][0]["up"]["kernel_lora_b"] == "trainable_b"
    assert labels["blocks"][0]["up"]["kernel"] == "frozen"
    tx = jlora.optimizer(optax.adam(1e-2), state)
    opt = tx.init(state)
    grads = jax.tree.map(jnp.ones_like, state)
    updates, _ = tx.update(grads, opt, state)
    new = optax.apply_updates(state, updates)
    assert isinstance(new, nnx.State)
    flat_new, flat_old = _flat(new), _flat(state)
    for p, v in flat_old.items():
        changed = not np.array_equal(flat_new[p].get_value(), v.get_value())
        assert changed == (p.endswith(("_lora_a", "_lora_b"))), p
    # differentiate only the trainable half
    g = jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(
        jlora.combine(t, frozen))))(trainable)
    assert jax.tree.structure(g) == jax.tree.structure(trainable)


def test_summary_counts_params_only():
    _, state = nnx.split(Sharded(nnx.Rngs(0)))
    out = jlora.inject(state, jlora.LoraConfig(rank=2, targets=["blocks.0"]), jax.random.key(1))
    s = jlora.summary(out)
    # kernels 2 * 24, biases 2 * 6, bn scale + bias 12; adapters 4 * 2 + 2 * 6
    assert (s.trainable, s.total) == (20, 48 + 12 + 12 + 20)


def test_a_target_that_matches_nothing_is_a_target_error_naming_state_paths():
    _, state = nnx.split(TinyLM())
    with pytest.raises(TargetError, match=r"match no module.*blocks\.\d\.(up|down)"):
        jlora.inject(state, jlora.LoraConfig(rank=2, targets=["upp"]), jax.random.key(0))
    with pytest.raises(TargetError, match="holds sub-modules"):  # a real container
        jlora.inject(state, jlora.LoraConfig(rank=2, targets=["attn"]), jax.random.key(0))
    # Variables are not read as sub-modules: 'up' is a layer with a kernel
    jlora.inject(state, jlora.LoraConfig(rank=2, targets=["up"]), jax.random.key(0))


def test_multi_axis_kernels_need_the_nnx_layout():
    model = TinyLM()
    _, state = nnx.split(model)
    with pytest.raises(LayoutError, match=r"jlora.layout\(model"):
        jlora.inject(state, jlora.LoraConfig(rank=2, targets=["qkv"]), jax.random.key(0))
    lay = jlora.layout(model)
    assert (lay["blocks.0.attn.qkv"].n_in, lay["blocks.0.attn.out"].n_in) == (1, 2)
    general = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), batch_axis={0: 5}, rngs=nnx.Rngs(0))
    assert "batch_axis" in jlora.layout(general)[""].unsupported


def test_layout_refuses_what_lora_cannot_adapt():
    rngs = nnx.Rngs(0)
    batched = nnx.Einsum("bhi,hio->bho", (2, 4, 3), rngs=rngs)  # h in input and output
    assert "both the input and the output" in jlora.layout(batched)[""].unsupported
    grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
    assert "grouped" in jlora.layout(grouped)[""].unsupported
    _, state = nnx.split(grouped)
    with pytest.raises(LayoutError, match="grouped"):
        jlora.inject(state, jlora.LoraConfig(rank=2, targets=".*"), jax.random.key(0),
                     layout=jlora.layout(grouped))


def test_checkpointer_saves_and_restores_states(tmp_path):
    config = jlora.LoraConfig(rank=2, targets=["up"])
    _, _, state = adapted(TinyLM(layers=1), config)
    trainable, _ = jlora.split(perturb_b(state))
    tx = jlora.optimizer(optax.adam(1e-3), trainable)
    saved = {"params": trainable, "opt": tx.init(trainable)}
    with jlora.checkpoint.Checkpointer(tmp_path, config) as ckpt:
        ckpt.save(3, saved)
        ckpt.wait()
        restored, position = ckpt.restore(saved)
    assert isinstance(restored["params"], nnx.State) and position == 3
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


def test_eagerly_sharded_kernels_give_adapters_placed_the_same_way():
    mesh = jlora.train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
    with jax.set_mesh(mesh):
        model = nnx.Linear(8, 4, kernel_init=init, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    out = jlora.inject(state, jlora.LoraConfig(rank=2, targets=".*", init="random"),
                       jax.random.key(0))
    a, b = out["kernel_lora_a"], out["kernel_lora_b"]
    assert a.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert a.get_metadata()["out_sharding"] == ("fsdp", None)
    x = jnp.ones((4, 8))
    y = jax.jit(jlora.lora(graphdef))(out, x)
    np.testing.assert_allclose(y, nnx.merge(graphdef, jlora.merge(out, unload=True))(x),
                               atol=1e-5)
