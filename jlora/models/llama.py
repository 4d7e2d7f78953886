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

from jlora import schema
from jlora.errors import HFError
from jlora.forward import layer_aliases
from jlora.models import common
from jlora.models.base import ArchSpec, ParamPath
from jlora.models.rope import inv_freq, rope_inv_freq, rope_parameters

_ACTIVATIONS = common.activations("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
_LAYER_TYPES = ("full_attention", "sliding_attention")

# The config.json fields the model reads (or that change its math), with transformers' defaults.
_FIELDS: dict[str, schema.Field] = {
    "vocab_size": schema.integer(),
    "hidden_size": schema.integer(),
    "intermediate_size": schema.integer(),
    "num_hidden_layers": schema.integer(),
    "num_attention_heads": schema.integer(),
    "num_key_value_heads": schema.integer(default=None, null=True),
    "head_dim": schema.integer(default=None, null=True),
    "rms_norm_eps": schema.float32(default=1e-6),
    "hidden_act": schema.choice(*_ACTIVATIONS, default="silu"),
    "tie_word_embeddings": schema.boolean(default=False),
    "initializer_range": schema.float32(lo_open=False, default=0.02),
    "attention_dropout": schema.Field(
        "0 (jlora's Llama-family model has no attention dropout)",
        lambda v: schema.is_number(v) and v == 0,
        default=0.0,
        null=True,
        fix="set it to 0.0, or train with transformers",
    ),
    "pretraining_tp": schema.integer(default=1, null=True),  # no effect on the math
    **common.UNSUPPORTED,
}
_WINDOW = schema.or_null(schema.integer(default=4096))
_BY_TYPE: dict[str, dict[str, schema.Field]] = {  # what each model_type reads beside _FIELDS
    "llama": {
        "max_position_embeddings": schema.integer(default=2048),
        "attention_bias": schema.boolean(default=False),
        "mlp_bias": schema.boolean(default=False),
    },
    "mistral": {
        "max_position_embeddings": schema.integer(default=131072),
        "sliding_window": _WINDOW,
    },
    "qwen2": {
        "max_position_embeddings": schema.integer(default=32768),
        "use_sliding_window": schema.boolean(default=False),
        "sliding_window": _WINDOW,
        "max_window_layers": schema.integer(0, default=28),
        "layer_types": schema.Field(
            f"a list of {' / '.join(map(repr, _LAYER_TYPES))}, one per layer",
            lambda v: isinstance(v, list) and all(t in _LAYER_TYPES for t in v),
            default=None,
            null=True,
        ),
    },
}


def _read(hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The checked config.json fields with what follows from them (head_dim, window, rope).

    Cheap (nothing here grows with the sizes it reads), so ``hf.load`` runs it before looking
    at any tensor; raises :class:`HFError` naming ``source``, the field and the fix.
    """
    model_type = hf.get("model_type", "llama")
    fields = {**_FIELDS, **_BY_TYPE.get(model_type, _BY_TYPE["llama"])}
    v = schema.read(hf, fields, source=source, error=HFError)
    n, heads = v["num_hidden_layers"], v["num_attention_heads"]
    bad = lambda field, want: schema.bad(HFError, source, field, v[field], want)
    if v["head_dim"] is None:
        if v["hidden_size"] % heads:
            raise bad("num_attention_heads", f"a divisor of hidden_size={v['hidden_size']}"
                      " (or set head_dim)")  # fmt: skip
        v["head_dim"] = v["hidden_size"] // heads
    elif v["head_dim"] % 2:
        raise bad("head_dim", "even (rotary embeddings rotate pairs of features)")
    kv_heads = v["num_key_value_heads"] = v["num_key_value_heads"] or heads
    if heads % kv_heads:
        raise bad("num_key_value_heads", f"a divisor of num_attention_heads={heads}")
    window = v.get("sliding_window")
    if model_type == "qwen2":
        window = window if v["use_sliding_window"] else None
        if v["layer_types"] is not None and len(v["layer_types"]) != n:
            raise bad("layer_types", f"a list of {n} entries (num_hidden_layers), one per layer")
    v["model_type"] = model_type
    v["window"] = window
    # Qwen2 has q/k/v biases, Mistral none, Llama what attention_bias / mlp_bias say.
    attention_bias = v.get("attention_bias", False)
    v["qkv_bias"], v["o_bias"] = (True, False) if model_type == "qwen2" else (attention_bias,) * 2
    v["mlp_bias"] = v.get("mlp_bias", False)
    v["rope"] = rope_parameters(hf, source, v["max_position_embeddings"])
    return v


def _windows(v: Mapping[str, Any]) -> tuple[int | None, ...] | None:
    """The attention window of each layer (``None`` for none), or ``None`` when no layer has one.

    Qwen2 windows the layers ``layer_types`` names ``sliding_attention`` (by default those from
    ``max_window_layers`` on); Mistral every layer; Llama none, as in transformers.
    """
    window, n = v["window"], v["num_hidden_layers"]
    if window is None:
        return None
    if v["model_type"] == "mistral":
        return (window,) * n
    types = v["layer_types"]
    if types is None:
        types = [_LAYER_TYPES[i >= v["max_window_layers"]] for i in range(n)]
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else None


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
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> DecoderConfig:
        """Reads a transformers config.json dict (llama, mistral or qwen2).

        Raises:
          HFError: naming ``source``, the field and the fix: a missing or mistyped field, an
            impossible value (heads that do not divide, a negative epsilon...), or what the
            model does not implement (another rope type, attention dropout, quantization...).
        """
        v = _read(hf, source)
        v["sliding_windows"] = _windows(v)
        v["rope_inv_freq"] = tuple(float(f) for f in inv_freq(v["rope"], v["head_dim"], source))
        return cls(**{k: x for k, x in v.items() if k in cls.__dataclass_fields__})


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


def _dense(module: nn.Module, features: int, bias: bool, name: str | None) -> nn.Dense:
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
        # heads before positions: the batched matmuls' operands in the layout they read
        q = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # b k g t d
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # b k s d
        scale = jnp.asarray(d**-0.5, self.dtype)

        def attend(q, k, v, allowed):
            scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) * scale
            scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
            return jnp.einsum("bkgts,bksd->bkgtd", probs, v)

        blocks = _causal_blocks(t) if layer_cache is None else 1
        if blocks == 1:
            out = attend(q, k, v, allowed)
        else:
            # causal: the queries of block i see no key after the block's end, so each block
            # of queries attends to the keys up to its end only (5/8 of the scores for 4
            # blocks); the skipped scores were masked, so the valid rows are unchanged
            n = t // blocks
            out = jnp.concatenate([
                attend(q[:, :, :, i * n:(i + 1) * n], k[:, :, :(i + 1) * n],
                       v[:, :, :(i + 1) * n], allowed[:, i * n:(i + 1) * n, :(i + 1) * n])
                for i in range(blocks)], axis=3)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads * d)
        return _dense(self, c.hidden_size, c.o_bias, "o_proj")(out), new_cache


def _causal_blocks(t: int, blocks: int = 4, min_block: int = 32) -> int:
    """Blocks of queries for causal attention over ``t`` positions without a cache: 4 when
    they divide ``t`` into blocks of at least ``min_block`` positions, else 1 (one matmul)."""
    return blocks if t % blocks == 0 and t // blocks >= min_block else 1


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


def _stack_layers(params: Mapping[str, Any], names: list[str]) -> Any:
    """The layers' param trees stacked along a new leading axis, or ``None`` when they differ
    in structure or shapes (adapters on some layers only, per-layer ranks)."""
    trees = [params.get(n) for n in names]
    if any(t is None for t in trees):
        return None
    leaves, treedefs = zip(*(jax.tree.flatten(t) for t in trees))
    if any(d != treedefs[0] for d in treedefs[1:]) or any(
            [(x.shape, x.dtype) for x in ls] != [(x.shape, x.dtype) for x in leaves[0]]
            for ls in leaves[1:]):
        return None
    # one concatenate per leaf along its first axis, then a reshape: cheap to trace
    def stack(xs):
        shape = xs[0].shape
        if not shape:
            xs = [jax.lax.reshape(x, (1,)) for x in xs]
        return jax.lax.reshape(jax.lax.concatenate(list(xs), 0), (len(xs), *shape))

    stacked = [stack(xs) for xs in zip(*leaves)]
    return jax.tree.unflatten(treedefs[0], stacked)


class DecoderStack(nn.Module):
    """``model.layers``: the blocks, named ``"0"``, ``"1"``... like transformers' ModuleList.

    With ``scan``, a forward pass without a KV cache traces one block and runs it over the
    layers' params stacked along a new axis (``lax.scan``): the trace and the compiled program
    no longer grow with the depth. The params keep their per-layer paths (and HF names); it
    applies when every layer has the same params (same adapters and ranks) and the same
    attention window, and falls back to the unrolled loop otherwise.
    """

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, layers_cache, cache_index):
        n = self.config.num_hidden_layers
        windows = self.config.sliding_windows or (None,) * n
        if self.scan and layers_cache is None and len(set(windows)) == 1 \
                and not self.is_initializing() and self.has_variable("params", "0"):
            names = [str(i) for i in range(n)]
            stacked = _stack_layers(self.variables["params"], names)
            if stacked is not None:
                return self._scan(stacked, names, windows[0], x, cos, sin, key_valid, q_slots,
                                  k_slots), None
        block = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        new = {}
        for i in range(self.config.num_hidden_layers):
            name = str(i)
            layer_cache = None if layers_cache is None else layers_cache[name]
            x, new[name] = block(self.config, windows[i], self.dtype, self.param_dtype, name=name)(
                x, cos, sin, key_valid, q_slots, k_slots, layer_cache, cache_index
            )
        return x, (new if layers_cache is not None else None)

    def _scan(self, stacked, names, window, x, cos, sin, key_valid, q_slots, k_slots):
        layer = DecoderLayer(self.config, window, self.dtype, self.param_dtype)
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        prefix = ".".join(str(p) for p in self.scope.path)

        def body(x, xs):
            params, i = xs
            rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, i)}
            y, _ = layer.apply({"params": params}, x, cos, sin, key_valid, q_slots, k_slots,
                               None, None, rngs=rngs)
            return y, None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        with layer_aliases([f"{prefix}.{name}" if prefix else name for name in names]):
            x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(len(names))))
        return x


class LlamaModel(nn.Module):
    """``model``: embeddings, decoder blocks and the final norm."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def setup(self):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            **kw,
        )
        self.layers = DecoderStack(c, remat=self.remat, scan=self.scan_layers, **kw)
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask, position_ids, cache):
        b, t = input_ids.shape
        index, key_valid, q_slots, k_slots = common.cache_slots(input_ids, attention_mask, cache)
        layers_cache = None if cache is None else cache["layers"]
        if position_ids is None:  # the same positions for every row: one (1, t, d) table
            position_ids = q_slots[None, :]
        inv_freq = jnp.asarray(self.config.rope_inv_freq, jnp.float32)
        freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)
        cos, sin = common.materialize(cos), common.materialize(sin)
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
      scan_layers: run the decoder blocks as a ``lax.scan`` over their stacked params (one
        traced block: compile time and program size independent of the depth); the params
        keep their paths. Used without a KV cache, when all layers have the same params.
    """

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype, self.param_dtype, self.remat,
                                self.scan_layers)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self, self.config.vocab_size, False, None)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits ``[batch, seq, vocab]``; ``(logits, new_cache)`` when a cache is passed.

        See :mod:`jlora.models.generate` for the cache semantics.
        """
        h, new_cache = self.model(input_ids, attention_mask, position_ids, cache)
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits if cache is None else (logits, new_cache)

    def hidden_and_head(self, input_ids, attention_mask=None, position_ids=None):
        """``(hidden, kernel)``: the final (normed) hidden states ``[batch, seq, hidden]`` and
        the output head as a ``(hidden, vocab)`` matrix in the compute dtype (``lm_head``'s
        kernel, or the transposed embedding when ``tie_word_embeddings``), so that
        ``logits == hidden @ kernel``.

        A loss can then run the head a chunk of tokens at a time
        (:func:`jlora.train.causal_lm_loss`). The kernel is read as it is: adapters of the
        head are not applied (the loss takes the logits path for a model with such adapters).
        """
        h = self.model(input_ids, attention_mask, position_ids, None)[0]
        if self.config.tie_word_embeddings:
            kernel = self.model.embed_tokens.variables["params"]["embedding"].T
        else:
            kernel = self.lm_head.variables["params"]["kernel"]
        return h, jnp.asarray(nn.meta.unbox(kernel), self.dtype)

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


def _expected_hf_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    v = _read(hf_config)
    h, inter, vocab = v["hidden_size"], v["intermediate_size"], v["vocab_size"]
    q, kv = v["num_attention_heads"] * v["head_dim"], v["num_key_value_heads"] * v["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not v["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(v["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{norm}.weight"] = (h,)
        for name, out, inp, bias in [
            ("self_attn.q_proj", q, h, v["qkv_bias"]),
            ("self_attn.k_proj", kv, h, v["qkv_bias"]),
            ("self_attn.v_proj", kv, h, v["qkv_bias"]),
            ("self_attn.o_proj", h, q, v["o_bias"]),
            ("mlp.gate_proj", inter, h, v["mlp_bias"]),
            ("mlp.up_proj", inter, h, v["mlp_bias"]),
            ("mlp.down_proj", h, inter, v["mlp_bias"]),
        ]:
            shapes[f"{p}.{name}.weight"] = (out, inp)
            if bias:
                shapes[f"{p}.{name}.bias"] = (out,)
    return shapes


def _example_inputs(hf_config: Mapping[str, Any]) -> tuple:
    return (jnp.zeros((1, 1), jnp.int32),)


SPEC = ArchSpec(
    model_types=("llama", "mistral", "qwen2"),
    check_config=_read,
    num_layers=lambda hf_config: _read(hf_config)["num_hidden_layers"],
    build=_build,
    hf_to_params=_hf_to_params,
    params_to_hf=_params_to_hf,
    expected_hf_shapes=_expected_hf_shapes,
    auto_class="AutoModelForCausalLM",
    example_inputs=_example_inputs,
)

__all__ = ["DecoderConfig", "LlamaForCausalLM", "RMSNorm", "SPEC", "rope_inv_freq"]
