"""Sharded train steps on 8 CPU devices: equal to one device, shardings kept, compiled once,
frozen params spread 8 ways by FSDP, clear errors for bad meshes and rules."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from _jtrain_util import data, make_params, rel
from jax.sharding import PartitionSpec as PS

import jlora
import jlora.train as T
from jlora.errors import MeshError


def _run(mesh_shape, steps=5, accum=2, model_params=None):
    model, params = model_params or make_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    mesh = T.make_mesh(dict(zip(T.AXES, mesh_shape)))
    state, frozen, sh = T.init(params, tx, jax.random.key(0), mesh=mesh)
    init_ok = _shardings_ok(state, sh.state) and _shardings_ok(frozen, sh.frozen)
    step = T.make_train_step(T.causal_lm_loss(model.apply), tx, sh, accum_steps=accum)
    ds, losses = data(), []
    for i in range(steps):
        state, m = step(state, frozen, T.shard_batch(ds.batch(i), sh.batch, multiple=accum))
        losses.append(float(m["loss"]))
    return losses, state, frozen, sh, step, init_ok


def _shardings_ok(tree, shardings) -> bool:
    return all(x.sharding.is_equivalent_to(s, x.ndim)
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def test_fsdp_tensor_equals_single_device():
    single, s_state, *_ = _run((1, 1, 1))
    losses, state, frozen, sh, step, init_ok = _run((2, 2, 2))
    err_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, single))
    err_params = rel(state.params, s_state.params)
    print(f"\nmax rel err over 5 steps: loss {err_loss:.2e}, adapters {err_params:.2e}")
    assert err_loss <= 1e-5 and err_params <= 1e-5
    # shardings as declared after init and after the updates
    assert init_ok
    assert _shardings_ok(state, sh.state) and _shardings_ok(frozen, sh.frozen)
    q = state.params["params"]["layer_0"]["q_proj"]
    assert q["kernel_lora_a"].sharding.spec == PS("fsdp", None)
    assert q["kernel_lora_b"].sharding.spec == PS(None, "tensor")
    assert frozen["params"]["layer_0"]["q_proj"]["kernel"].sharding.spec == PS("fsdp", "tensor")
    assert frozen["params"]["layer_0"]["o_proj"]["kernel"].sharding.spec == PS("tensor", "fsdp")
    # traced and compiled once over the 5 steps
    assert step.trace_count == 1 and step.jitted._cache_size() == 1


def test_fsdp_frozen_argument_bytes():
    """Per-device argument bytes of the step under 8-way FSDP vs one device."""
    model, params = make_params()
    tx = optax.adamw(1e-2)
    figures = {}
    for n in (1, 8):
        mesh = T.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices=jax.devices()[:n])
        state, frozen, sh = T.init(params, tx, jax.random.key(0), mesh=mesh)
        step = T.make_train_step(T.causal_lm_loss(model.apply), tx, sh)
        batch = T.shard_batch(data().batch(0), sh.batch)
        mem = step.lower(state, frozen, batch).compile().memory_analysis()
        # the frozen params' share: whole step args minus the per-device bytes of the others
        others = sum(x.addressable_shards[0].data.nbytes
                     for x in jax.tree.leaves((state, batch)))
        frozen_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(frozen))
        figures[n] = (mem.argument_size_in_bytes - others, frozen_dev,
                      mem.argument_size_in_bytes)
    ratio = figures[8][0] / figures[1][0]
    total_ratio = figures[8][2] / figures[1][2]
    print(f"\nfrozen argument bytes/device: 1 dev {figures[1][0]}, 8-way FSDP {figures[8][0]} "
          f"-> ratio {ratio:.4f} (bound {1.15 / 8:.4f}); all step args ratio {total_ratio:.4f}")
    assert figures[8][0] == figures[8][1] and figures[1][0] == figures[1][1]
    assert ratio <= 1.15 / 8


def test_param_specs_follow_rules_and_kernels():
    _, params = make_params()
    mesh = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = ((r"q_proj\.kernel$", PS("tensor", "fsdp")), (r".*", PS()))
    specs = T.param_specs(params, mesh, rules)["params"]
    q = specs["layer_0"]["q_proj"]
    assert (q["kernel"], q["kernel_lora_a"], q["kernel_lora_b"], q["kernel_lora_scale"]) == (
        PS("tensor", "fsdp"), PS("tensor", None), PS(None, "fsdp"), PS())
    assert specs["layer_0"]["v_proj"]["kernel_lora_a"] == PS(None, None)
    # a mesh axis that does not divide a dim is dropped for that dim
    assert T.param_specs({"kernel": np.zeros((3, 8))}, mesh, ((".*", PS("fsdp", "tensor")),)
                         )["kernel"] == PS(None, "tensor")


def test_bad_mesh_rules_and_batches():
    with pytest.raises(MeshError, match="needs 16 devices but only 8"):
        T.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    mesh = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = make_params()
    with pytest.raises(MeshError, match="names mesh axis 'model'.*has axes"):
        T.param_specs(params, mesh, ((r"kernel$", PS("fsdp", "model")),))
    with pytest.raises(MeshError, match="names mesh axis 'expert'"):
        T.init(params, optax.sgd(0.1), jax.random.key(0), mesh=mesh,
               rules=((r"q_proj", PS("expert")), *T.DEFAULT_RULES))
    with pytest.raises(MeshError, match="6 rows, which do not divide across 4"):
        T.shard_batch(data(batch_size=6).batch(0), T.batch_sharding(mesh))
    model, params = make_params()
    state, frozen, sh = T.init(params, optax.sgd(0.1), jax.random.key(0), mesh=mesh)
    step = T.make_train_step(T.causal_lm_loss(model.apply), optax.sgd(0.1), sh, accum_steps=4)
    batch = jax.tree.map(np.asarray, data(batch_size=8).batch(0))
    with pytest.raises(MeshError, match=r"8 rows.*4 data-parallel shards x 4 micro-batches"):
        step(state, frozen, batch)
    assert isinstance(MeshError("x"), jlora.JloraError)


def _specs_of(model, example, mesh):
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    flat = jax.tree_util.tree_flatten_with_path(T.param_specs(shapes, mesh))[0]
    return {jlora.paths.keypath_to_path(kp).removeprefix("params."): s for kp, s in flat}


def test_default_rules_on_jlora_models():
    """Megatron-style layout of the default rules on jlora's Llama and GPT-2 (shape-only)."""
    from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from jlora.models.llama import DecoderConfig, LlamaForCausalLM

    mesh = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    ids = np.zeros((1, 4), np.int32)
    llama = _specs_of(LlamaForCausalLM(DecoderConfig.from_hf(hf)), ids, mesh)
    col, row = PS("fsdp", "tensor"), PS("tensor", "fsdp")
    layer = "model.layers.0."
    for name, spec in [("self_attn.q_proj", col), ("self_attn.k_proj", col), ("mlp.up_proj", col),
                       ("mlp.gate_proj", col), ("self_attn.o_proj", row), ("mlp.down_proj", row)]:
        assert llama[f"{layer}{name}.kernel"] == spec, name
    assert llama["model.embed_tokens.embedding"] == PS("tensor", "fsdp")
    assert llama["lm_head.kernel"] == col and llama["model.norm.scale"] == PS(None)
    gpt2 = _specs_of(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=32,
                                                n_layer=1, n_head=4)), ids, mesh)
    assert gpt2["transformer.h.0.attn.c_attn.kernel"] == col
    assert gpt2["transformer.h.0.attn.c_attn.bias"] == PS("tensor")
    assert gpt2["transformer.h.0.attn.c_proj.kernel"] == row
    assert gpt2["transformer.h.0.mlp.c_fc.kernel"] == col
    assert gpt2["transformer.h.0.mlp.c_proj.kernel"] == row


def test_per_process_batches():
    """With one process, a per-process batch is the global batch."""
    mesh = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = data().batch(0)
    x = T.shard_batch(b, T.batch_sharding(mesh), is_global=False)
    y = T.shard_batch(b, T.batch_sharding(mesh))
    for a, c in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        assert a.sharding == c.sharding
