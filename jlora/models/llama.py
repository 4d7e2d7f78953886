"""Llama-family decoders (Llama, Mistral, Qwen2) as Flax linen models with transformers parity.

Param paths equal transformers' module names: ``model.embed_tokens.embedding``,
``model.layers.0.self_attn.q_proj.kernel``, ``model.norm.scale``, ``lm_head.kernel`` (absent
when ``tie_word_embeddings``; the logits then come from ``embed_tokens.attend``). Every
projection is an ``nn.Dense`` and the embedding an ``nn.Embed``, so jlora's adapters reach
them. The KV cache follows the contract in :mod:`jlora.models.generate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import HFError
from jlora.models import common
from jlora.models.base import ArchSpec, ParamPath
from jlora.models.rope import rope_inv_freq

_ACTIVATIONS = common.activations("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of a Llama/Mistral/Qwen2 config.json that change the math.

    ``rope_inv_freq`` holds the rotary inverse frequencies (default, linear or llama3 rope),
    ``sliding_windows`` one window (or ``None``) per layer.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_inv_freq: tuple[float, ...]
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_windows: tuple[int | None, ...] | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        common.check_activation("Llama-family", self, "hidden_act", _ACTIVATIONS)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> DecoderConfig:
        """Reads a transformers config.json dict (llama, mistral or qwen2)."""
        model_type = hf.get("model_type")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise HFError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        n = hf["num_hidden_layers"]
        window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
        if hf.get("use_sliding_window") is False:  # qwen2 keeps a sliding_window it ignores
            window = None
        windows = tuple(
            window if layer_types is None or layer_types[i] == "sliding_attention" else None
            for i in range(n)
        )
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_inv_freq=tuple(float(f) for f in rope_inv_freq(hf, head_dim)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            sliding_windows=windows if any(w is not None for w in windows) else None,
            initializer_range=hf.get("initializer_range", 0.02),
        )


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then multiply by ``scale``."""

    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        dtype = self.dtype or x.dtype
        return scale.astype(dtype) * h.astype(dtype)


def _dense(module: nn.Module, features: int, bias: bool, name: str) -> nn.Dense:
    """An ``nn.Dense`` (kernel (in, out)) with the module's dtypes and HF's normal init."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.initializers.normal(module.config.initializer_range),
        name=name,
    )


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    config: DecoderConfig
    window: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, layer_cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(self, heads * d, c.qkv_bias, "q_proj")(x).reshape(b, t, heads, d)
        k = _dense(self, kv_heads * d, c.qkv_bias, "k_proj")(x).reshape(b, t, kv_heads, d)
        v = _dense(self, kv_heads * d, c.qkv_bias, "v_proj")(x).reshape(b, t, kv_heads, d)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        new_cache = None
        if layer_cache is not None:
            new_cache, k, v = common.update_kv_cache(layer_cache, k, v, cache_index, self.dtype)
        # allowed[b, q, s]: a real key at or before the query (and inside the window)
        allowed = key_valid[:, None, :] & (k_slots[None, None, :] <= q_slots[None, :, None])
        if self.window is not None:
            allowed = allowed & (k_slots[None, None, :] > q_slots[None, :, None] - self.window)
        groups = heads // kv_heads
        q = q.reshape(b, t, kv_heads, groups, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(d**-0.5, self.dtype)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads * d)
        return _dense(self, c.hidden_size, c.o_bias, "o_proj")(out), new_cache


class MLP(nn.Module):
    """The gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda f, name: _dense(self, f, c.mlp_bias, name)
        act = _ACTIVATIONS[c.hidden_act]
        gate = dense(c.intermediate_size, "gate_proj")(x)
        h = act(gate) * dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block (``model.layers.<i>``)."""

    config: DecoderConfig
    window: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, layer_cache, cache_index):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, new_cache = Attention(c, self.window, name="self_attn", **kw)(
            h, cos, sin, key_valid, q_slots, k_slots, layer_cache, cache_index
        )
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + MLP(c, name="mlp", **kw)(h), new_cache


class DecoderStack(nn.Module):
    """``model.layers``: the blocks, named ``"0"``, ``"1"``... like transformers' ModuleList."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, layers_cache, cache_index):
        block = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        windows = self.config.sliding_windows or (None,) * self.config.num_hidden_layers
        new = {}
        for i in range(self.config.num_hidden_layers):
            name = str(i)
            layer_cache = None if layers_cache is None else layers_cache[name]
            x, new[name] = block(self.config, windows[i], self.dtype, self.param_dtype, name=name)(
                x, cos, sin, key_valid, q_slots, k_slots, layer_cache, cache_index
            )
        return x, (new if layers_cache is not None else None)


class LlamaModel(nn.Module):
    """``model``: embeddings, decoder blocks and the final norm."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            **kw,
        )
        self.layers = DecoderStack(c, remat=self.remat, **kw)
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask, position_ids, cache):
        b, t = input_ids.shape
        index, key_valid, q_slots, k_slots = common.cache_slots(input_ids, attention_mask, cache)
        layers_cache = None if cache is None else cache["layers"]
        if position_ids is None:
            position_ids = jnp.broadcast_to(q_slots, (b, t))
        inv_freq = jnp.asarray(self.config.rope_inv_freq, jnp.float32)
        freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)
        x = self.embed_tokens(input_ids)
        x, new_layers = self.layers(x, cos, sin, key_valid, q_slots, k_slots, layers_cache, index)
        new_cache = None
        if cache is not None:
            new_cache = {"index": index + t, "mask": key_valid, "layers": new_layers}
        return self.norm(x), new_cache

    def attend(self, h):
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """A Llama/Mistral/Qwen2 causal LM; ``transformers``' ``*ForCausalLM`` in linen.

    Attributes:
      config: the architecture (build one with :meth:`DecoderConfig.from_hf`).
      dtype: compute dtype.
      param_dtype: dtype of the params ``init`` creates.
      remat: rematerialise each decoder block in the backward pass (``nn.remat``).
    """

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits ``[batch, seq, vocab]``; ``(logits, new_cache)`` when a cache is passed.

        See :mod:`jlora.models.generate` for the cache semantics.
        """
        base = LlamaModel(self.config, self.dtype, self.param_dtype, self.remat, name="model")
        h, new_cache = base(input_ids, attention_mask, position_ids, cache)
        if self.config.tie_word_embeddings:
            logits = base.attend(h)
        else:
            logits = _dense(self, self.config.vocab_size, False, "lm_head")(h)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> dict:
        """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        c = self.config
        return common.empty_cache(
            batch_size,
            max_length,
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            dtype or self.dtype,
        )


# ---------------------------------------------------------------------------------------
# HF <-> jlora names


def _build(hf_config: Mapping[str, Any], dtype: Any = None) -> LlamaForCausalLM:
    return common.build(LlamaForCausalLM, DecoderConfig.from_hf(hf_config), dtype)


def _is_norm(module: str) -> bool:
    return module.rsplit(".", 1)[-1].endswith("norm")


def _hf_to_params(name: str, array: np.ndarray) -> tuple[ParamPath, np.ndarray] | None:
    if name.endswith("inv_freq"):
        return None
    module, _, leaf = name.rpartition(".")
    path = tuple(module.split("."))
    if leaf == "bias":
        return (*path, "bias"), array
    if leaf != "weight":
        raise HFError(f"tensor {name!r} is not a weight or bias of a llama-family model")
    if module.endswith("embed_tokens"):
        return (*path, "embedding"), array
    if _is_norm(module):
        return (*path, "scale"), array
    return (*path, "kernel"), array.T


def _params_to_hf(path: ParamPath, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return common.linear_params_to_hf("Llama-family model", path, array)


def _expected_hf_keys(hf_config: Mapping[str, Any]) -> set[str]:
    c = DecoderConfig.from_hf(hf_config)
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not c.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for proj, bias in [
            ("q", c.qkv_bias),
            ("k", c.qkv_bias),
            ("v", c.qkv_bias),
            ("o", c.o_bias),
        ]:
            keys.add(f"{p}.self_attn.{proj}_proj.weight")
            if bias:
                keys.add(f"{p}.self_attn.{proj}_proj.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys.add(f"{p}.mlp.{proj}.weight")
            if c.mlp_bias:
                keys.add(f"{p}.mlp.{proj}.bias")
    return keys


def _example_inputs(hf_config: Mapping[str, Any]) -> tuple:
    return (jnp.zeros((1, 1), jnp.int32),)


SPEC = ArchSpec(
    model_types=("llama", "mistral", "qwen2"),
    build=_build,
    hf_to_params=_hf_to_params,
    params_to_hf=_params_to_hf,
    expected_hf_keys=_expected_hf_keys,
    auto_class="AutoModelForCausalLM",
    example_inputs=_example_inputs,
)

__all__ = ["DecoderConfig", "LlamaForCausalLM", "RMSNorm", "SPEC", "rope_inv_freq"]
