"""Small Flax NNX models for the NNX tests: a transformer block stack (Embed with a tied
head, a LinearGeneral qkv and an Einsum output projection, Linear MLPs), and a Conv net."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jlora


class Attention(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.LinearGeneral(d, (3, heads, d // heads), rngs=rngs)
        self.out = nnx.Einsum("bthk,hkd->btd", (heads, d // heads, d), (d,), rngs=rngs)

    def __call__(self, x):
        q, k, v = jnp.moveaxis(self.qkv(x), 2, 0)
        t = x.shape[1]
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        return self.out(jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v))


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.attn = Attention(d, 2, rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(jax.nn.gelu(self.up(x)))


class TinyLM(nnx.Module):
    """Token ids -> logits; the head is the embedding's ``attend`` (tied)."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 2, *, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(layers)])

    def __call__(self, ids, attention_mask=None):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(x)


class ConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=(2, 1), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)))


TARGETS = ["qkv", "out", "up", "down", "embed"]


def adapted(model: nnx.Module, config: jlora.LoraConfig, seed: int = 1):
    """``(graphdef, base state, adapted state)``."""
    graphdef, state = nnx.split(model)
    return graphdef, state, jlora.inject(state, config, jax.random.key(seed),
                                         layout=jlora.layout(model))


def perturb_b(state: nnx.State, seed: int = 7, scale: float = 0.3) -> nnx.State:
    """Every ``*_lora_b`` leaf set to random normal values (B is zero after inject)."""
    flat = nnx.to_flat_state(state)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    out = {}
    for path, var in flat:
        key = next(keys)
        if str(path[-1]).endswith("_lora_b"):
            var = var.replace(scale * jax.random.normal(key, var.get_value().shape))
        out[tuple(path)] = var
    return nnx.State.from_flat_path(out)
