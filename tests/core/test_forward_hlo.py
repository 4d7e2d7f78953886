"""Deterministic guards on the compiled LoRA step (issue 8): the adapter path runs on the 2-D
token layout, so the backward pass makes no transposed copy of a layer's output gradient."""

from __future__ import annotations

import re

import jax
import optax

import jlora
from jlora.models.llama import DecoderConfig, LlamaForCausalLM

BATCH, SEQ = 2, 24  # 48 tokens: no feature size below equals it


def test_no_transposed_copy_of_an_adapted_layers_output_gradient():
    cfg = DecoderConfig(vocab_size=72, hidden_size=40, intermediate_size=104,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=10, rms_norm_eps=1e-6, rope_inv_freq=(1.0, 0.1, 0.01, 0.001, 1e-4))
    model = LlamaForCausalLM(cfg)
    data = jlora.train.SyntheticTokens(vocab_size=72, seq_len=SEQ, batch_size=BATCH)
    base = model.init(jax.random.key(0), data.batch(0)["input_ids"])
    lcfg = jlora.LoraConfig(rank=4, targets="all-linear", dropout=0.1)
    params = jlora.inject(base, lcfg, jax.random.key(1))
    tx = optax.adamw(1e-3)
    mesh = jlora.train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(2), mesh=mesh)
    loss = jlora.train.causal_lm_loss(model.apply, dropout=0.1)
    step = jlora.train.make_train_step(loss, tx, sh)
    batch = jlora.train.shard_batch(data.batch(0), sh.batch)
    hlo = step.lower(state, frozen, batch).compile().as_text()
    tokens = BATCH * SEQ
    outs = {e.shape[1] for e in jlora.plan(base, lcfg)}
    assert outs == {40, 104, 20}  # q/o/down, gate/up, k/v (2 kv heads x 10)
    for out in outs:
        transposed = re.compile(rf"= f32\[{out},{tokens}\]\{{1,0\}} (copy|transpose|fusion)")
        bad = [line.strip()[:160] for line in hlo.splitlines() if transposed.search(line)]
        assert not bad, bad
