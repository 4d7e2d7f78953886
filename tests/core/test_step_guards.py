"""Deterministic guards on the compiled train step (issue 8): compiled FLOPs and bytes, and the
trace + lower time of deep models; no wall-clock timings of a step."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.llama import DecoderConfig, LlamaForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(layers=2, vocab=512, hidden=128, inter=344, heads=4, kv=2):
    d = hidden // heads
    return DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=d, rms_norm_eps=1e-6,
                         rope_inv_freq=tuple(10000.0 ** (-i / d) for i in range(0, d, 2)))


def _lora_step(model, ids, targets=ALL, rank=8, tx=None, **loss_kw):
    """The library's default LoRA step (jlora.train), lowered."""
    base = model.init(jax.random.key(0), ids[:1, :8])
    params = jlora.inject(base, jlora.LoraConfig(rank=rank, targets=targets), jax.random.key(1))
    tx = tx or optax.adamw(1e-3)
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(2))
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(model.apply, **loss_kw), tx,
                                       sh)
    batch = jlora.train.shard_batch({"input_ids": ids}, sh.batch)
    return step, (state, frozen, batch), base


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


def test_lora_step_flops_at_most_072_of_full_fine_tuning():
    """The issue's Llama shape scaled down (hidden 256, intermediate 688, rank 8 on all seven
    projections), both steps through the same chunked loss."""
    model = LlamaForCausalLM(_config(vocab=2048, hidden=256, inter=688))
    ids = jax.random.randint(jax.random.key(3), (4, 64), 0, 2048)
    step, args, base = _lora_step(model, ids)
    lora = _flops(step.lower(*args).compile())
    loss_fn = jlora.train.causal_lm_loss(model.apply)
    tx = optax.adamw(1e-3)

    def full_step(params, opt_state, batch):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    full = _flops(jax.jit(full_step, donate_argnums=(0, 1)).lower(
        base, tx.init(base), {"input_ids": ids}).compile())
    assert lora / full <= 0.72, (lora, full)


def test_merged_forward_flops_equal_the_base_models_exactly():
    model = LlamaForCausalLM(_config())
    ids = jnp.zeros((2, 32), jnp.int32)
    base = model.init(jax.random.key(0), ids)
    params = jlora.inject(base, jlora.LoraConfig(rank=8, targets="all-linear", init="random"),
                          jax.random.key(1))
    base_flops = _flops(jax.jit(model.apply).lower(base, ids).compile())
    unloaded = _flops(jax.jit(model.apply).lower(jlora.merge(params, unload=True), ids).compile())
    kept = _flops(jax.jit(jlora.lora(model.apply)).lower(jlora.merge(params), ids).compile())
    assert unloaded == base_flops and kept == base_flops, (base_flops, unloaded, kept)


def test_loss_temporaries_grow_with_the_vocabulary_by_one_chunk_only():
    """The chunked cross-entropy holds (chunk, vocab) arrays, never (tokens, vocab) ones."""
    tokens, chunk = 8 * 128, 256

    def temp(vocab, chunk_size):
        model = LlamaForCausalLM(_config(layers=1, vocab=vocab, hidden=64, inter=128))
        step, args, _ = _lora_step(model, jnp.zeros((8, 128), jnp.int32), rank=4,
                                   chunk_size=chunk_size)
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    grow = lambda chunk_size: temp(8192, chunk_size) - temp(1024, chunk_size)  # noqa: E731
    per_row = (8192 - 1024) * 4  # one float32 row of logits
    assert grow(chunk) <= 3 * chunk * per_row, grow(chunk) / per_row
    # the whole-batch path (chunk_size=None) holds the logits of every token, and more
    assert grow(None) >= tokens * per_row


def _trace_lower_seconds(layers: int, targets) -> float:
    """CPU seconds (this process: tracing is single-threaded Python) to trace and lower the
    LoRA step of a scanned model, the best of three."""
    model = LlamaForCausalLM(_config(layers=layers, vocab=64, hidden=32, inter=64),
                             scan_layers=True)
    best = np.inf
    for _ in range(3):
        step, args, _ = _lora_step(model, jnp.zeros((2, 8), jnp.int32), targets=targets,
                                   rank=2, tx=optax.flatten(optax.adamw(1e-3)))
        t0 = time.process_time()
        step.lower(*args)
        best = min(best, time.process_time() - t0)
    return best


def test_compile_time_of_a_32_layer_step_within_2x_of_an_8_layer_one():
    """With ``scan_layers`` one decoder block is traced whatever the depth. What still grows
    with the depth is per adapter leaf: the optimizer's update (optax.adamw emits ~40 ops
    per leaf, which ``optax.flatten`` turns into one update over all adapters), the gradient
    norm, the state's conditional. PEFT's default targets for Llama (q_proj, v_proj)."""
    targets = ["q_proj", "v_proj"]
    _trace_lower_seconds(2, targets)  # warm JAX's caches
    t8, t32 = _trace_lower_seconds(8, targets), _trace_lower_seconds(32, targets)
    assert t32 <= 2 * t8, (t8, t32)


def _loss_and_grads(model, params, batch, **kw):
    loss_fn = jlora.train.causal_lm_loss(model.apply, **kw)
    return jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0])(params)


def _perturbed(params, key):
    """Every adapter leaf random (B is zero at init: the comparison would be vacuous)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(key, len(flat)))
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
        if "_lora_" in jax.tree_util.keystr(kp) and x.ndim else x, params)


def test_chunked_loss_equals_the_logits_path_in_value_and_gradients():
    """Masked and padded targets, a chunk that does not divide the sequence, an adapted
    head (which takes the logits path), a tied head: same loss and gradients as the logits."""
    for tied, targets in ((False, ALL), (False, [*ALL, "lm_head"]), (True, ALL)):
        cfg = _config(vocab=300)
        if tied:
            import dataclasses
            cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        ids = jax.random.randint(jax.random.key(4), (3, 21), 0, 300)
        base = model.init(jax.random.key(0), ids)
        params = _perturbed(jlora.inject(base, jlora.LoraConfig(rank=4, targets=targets),
                                         jax.random.key(1)), jax.random.key(2))
        labels = ids.at[:, :5].set(-100)
        batch = {"input_ids": ids, "labels": labels,
                 "attention_mask": jnp.ones_like(ids).at[2, 15:].set(0)}
        ref_loss, ref_g = _loss_and_grads(model, params, batch, chunk_size=None)
        loss, g = _loss_and_grads(model, params, batch, chunk_size=8)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                     g, ref_g)


def test_blocked_causal_attention_equals_one_block_in_value_and_gradients(monkeypatch):
    """128 positions: 4 blocks of queries, each attending to the keys up to its end; with
    right padding (the rows a loss counts), the same loss and gradients as one block."""
    from jlora.models import llama

    assert llama._causal_blocks(128) == 4 and llama._causal_blocks(100) == 1
    model = LlamaForCausalLM(_config(vocab=97))
    ids = jax.random.randint(jax.random.key(5), (2, 128), 0, 97)
    base = model.init(jax.random.key(0), ids[:, :8])
    params = _perturbed(jlora.inject(base, jlora.LoraConfig(rank=4, targets=ALL),
                                     jax.random.key(1)), jax.random.key(2))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[1, 90:].set(0)}
    loss, g = _loss_and_grads(model, params, batch)
    monkeypatch.setattr(llama, "_causal_blocks", lambda t: 1)
    ref_loss, ref_g = _loss_and_grads(model, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), g, ref_g)
