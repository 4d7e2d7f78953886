"""Shared helpers of the jlora.train tests: a tiny linen decoder LM and its adapted params."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora

VOCAB, HIDDEN, FF, HEADS, LAYERS, SEQ = 64, 32, 64, 4, 2, 8


class Block(nn.Module):
    """A pre-norm decoder block with Llama's layer names."""

    dtype: jnp.dtype = jnp.float32
    ff: int = FF

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=self.dtype, name=name)
        h = nn.RMSNorm(dtype=self.dtype, name="input_layernorm")(x)
        q = dense(d, "q_proj")(h).reshape(b, t, HEADS, d // HEADS)
        k = dense(d, "k_proj")(h).reshape(b, t, HEADS, d // HEADS)
        v = dense(d, "v_proj")(h).reshape(b, t, HEADS, d // HEADS)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // HEADS).astype(self.dtype)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask[:, None, None, :]
        s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
        p = jax.nn.softmax(s.astype(jnp.float32), -1).astype(self.dtype)
        x = x + dense(d, "o_proj")(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d))
        h = nn.RMSNorm(dtype=self.dtype, name="post_attention_layernorm")(x)
        return x + dense(d, "down_proj")(nn.silu(dense(self.ff, "gate_proj")(h)) * dense(self.ff, "up_proj")(h))


class TinyLM(nn.Module):
    """``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``, ``lm_head``."""

    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    layers: int = LAYERS
    vocab: int = VOCAB
    hidden: int = HIDDEN
    ff: int = FF

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        block = nn.remat(Block) if self.remat else Block
        x = nn.Embed(self.vocab, self.hidden, dtype=self.dtype, name="embed_tokens")(input_ids)
        for i in range(self.layers):
            x = block(self.dtype, self.ff, name=f"layer_{i}")(x, attention_mask > 0)
        x = nn.RMSNorm(dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="lm_head")(x)


CONFIG = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "up_proj",
                                                    "down_proj"], init="random")


def make_params(model: TinyLM | None = None, config: jlora.LoraConfig = CONFIG, seed: int = 0):
    """``(model, adapted params)`` of a TinyLM on host memory, deterministic in ``seed``."""
    model = model or TinyLM()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    rng = np.random.default_rng(seed)  # host-side init: no XLA compile
    params = jax.tree.map(
        lambda s: (1.0 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1 else
                   rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32),
        shapes)
    return model, jlora.inject(params, config, jax.random.key(seed + 1))


def data(batch_size: int = 8, seed: int = 0, vocab: int = VOCAB):
    """The shared deterministic data source (right-padded rows)."""
    return jlora.train.SyntheticTokens(vocab, SEQ, batch_size, seed=seed, min_len=SEQ - 3)


def rel(a, b) -> float:
    """Max relative error between two arrays/trees (relative to b's max magnitude)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    out = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)))
    return out
