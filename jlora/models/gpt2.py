"""GPT-2 as a Flax linen model with ``transformers.GPT2LMHeadModel`` parity.

Param paths equal the transformers module names (``transformer.h.0.attn.c_attn``), so PEFT
``target_modules`` such as ``["c_attn"]`` carry over unchanged. GPT-2's ``Conv1D`` layers are
plain ``nn.Dense`` here: ``Conv1D`` stores its weight as (in, out), which is already a Dense
kernel, so the name map copies those tensors without a transpose (and PEFT marks them
``fan_in_fan_out``). The output head is tied to ``wte`` (``wte.attend``) unless the config
sets ``tie_word_embeddings: false``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jlora import schema
from jlora.errors import JloraError
from jlora.models import common
from jlora.models.base import ArchSpec, ParamPath

__all__ = ["GPT2Config", "GPT2LMHeadModel", "SPEC"]

_ACTIVATIONS = common.activations(
    "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish", "tanh"
)


@dataclass(frozen=True)
class GPT2Config:
    """The fields of a GPT-2 ``config.json`` that change the math.

    Example:
      >>> GPT2Config.from_hf({"vocab_size": 50, "n_embd": 32, "n_head": 4, "n_layer": 2}).head_dim
      8
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    def __post_init__(self):
        common.check_heads("GPT-2", self, "n_embd", "n_head")
        common.check_activation("GPT-2", self, "activation_function", _ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP (``n_inner``, or 4 * ``n_embd`` when unset)."""
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> GPT2Config:
        """Reads a ``config.json`` dict: the fields this model uses, checked, and those that
        would switch on what it does not implement (cross-attention, quantization...).

        transformers' other names of the sizes (``hidden_size``, ``num_attention_heads``,
        ``num_hidden_layers``, ``max_position_embeddings``) are read too.

        Raises:
          HFError: naming ``source``, the field and the fix.
        """
        return common.dataclass_from_hf(cls, hf_config, _FIELDS, source, ("n_embd", "n_head"))


_PROBABILITY = schema.number(0, 1, default=0.1)
# The config.json fields the model reads (or that change its math), with transformers' defaults.
_FIELDS: dict[str, schema.Field] = {
    "vocab_size": schema.integer(),
    "n_embd": schema.integer(aliases=("hidden_size",)),
    "n_layer": schema.integer(aliases=("num_hidden_layers",)),
    "n_head": schema.integer(aliases=("num_attention_heads",)),
    "n_positions": schema.integer(default=1024, aliases=("max_position_embeddings",)),
    "n_inner": schema.integer(default=None, null=True),
    "activation_function": schema.choice(*_ACTIVATIONS, default="gelu_new"),
    "layer_norm_epsilon": schema.float32(default=1e-5),
    "scale_attn_weights": schema.boolean(default=True),
    "scale_attn_by_inverse_layer_idx": schema.boolean(default=False),
    "reorder_and_upcast_attn": schema.boolean(default=False),  # scores are float32 here anyway
    "tie_word_embeddings": schema.boolean(default=True),
    "embd_pdrop": _PROBABILITY,
    "attn_pdrop": _PROBABILITY,
    "resid_pdrop": _PROBABILITY,
    "add_cross_attention": schema.unsupported(
        "jlora's GPT-2 has no cross-attention", "use transformers for encoder-decoder GPT-2"
    ),
    **common.UNSUPPORTED,
}


def _attend(q, k, v, mask, scale, dropout, deterministic):
    """Softmax attention over (batch, len, heads, head_dim); ``mask`` broadcasts to (b,h,q,k)."""
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    return common.softmax_attend(w, v, mask, lambda w: dropout(w, deterministic=deterministic))


class GPT2Attention(nn.Module):
    """Causal self-attention with the fused ``c_attn`` projection."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic=True, kv_cache=None, cache_index=None):
        cfg = self.config
        dense = lambda n, name: nn.Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        b, t, _ = x.shape
        q, k, v = jnp.split(dense(3 * cfg.n_embd, "c_attn")(x), 3, axis=-1)
        q, k, v = (y.reshape(b, t, cfg.n_head, cfg.head_dim) for y in (q, k, v))
        new_cache = None
        if kv_cache is not None:
            new_cache, k, v = common.update_kv_cache(kv_cache, k, v, cache_index, self.dtype)
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        drop = nn.Dropout(cfg.attn_pdrop, name="attn_dropout")
        y = _attend(q, k, v, mask, scale, drop, deterministic).reshape(b, t, cfg.n_embd)
        y = dense(cfg.n_embd, "c_proj")(y)
        y = nn.Dropout(cfg.resid_pdrop, name="resid_dropout")(y, deterministic=deterministic)
        return y, new_cache


class GPT2MLP(nn.Module):
    """``c_fc`` -> activation -> ``c_proj``."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(cfg.inner_dim, name="c_fc", **kw)(x)
        x = nn.Dense(cfg.n_embd, name="c_proj", **kw)(_ACTIVATIONS[cfg.activation_function](x))
        return nn.Dropout(cfg.resid_pdrop, name="dropout")(x, deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-LayerNorm transformer block: ``ln_1``, ``attn``, ``ln_2``, ``mlp``."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic=True, kv_cache=None, cache_index=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(cfg.layer_norm_epsilon, name=name, **kw)
        attn = GPT2Attention(cfg, self.layer_idx, name="attn", **kw)
        y, new_cache = attn(ln("ln_1")(x), mask, deterministic, kv_cache, cache_index)
        x = x + y
        x = x + GPT2MLP(cfg, name="mlp", **kw)(ln("ln_2")(x), deterministic)
        return x, new_cache


class GPT2Blocks(nn.Module):
    """The ``h`` container: blocks named ``'0'``, ``'1'``... as in ``nn.ModuleList``."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic=True, cache=None, cache_index=None):
        new_cache = {}
        for i in range(self.config.n_layer):
            name = str(i)
            block = GPT2Block(
                self.config, i, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )
            x, new_cache[name] = block(
                x, mask, deterministic, None if cache is None else cache[name], cache_index
            )
        return x, (None if cache is None else new_cache)


class GPT2Model(nn.Module):
    """The ``transformer`` trunk: embeddings, blocks, final LayerNorm."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, mask, position_ids, deterministic=True, cache=None, index=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte", **kw)
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe", **kw)
        x = wte(input_ids) + wpe(position_ids)
        x = nn.Dropout(cfg.embd_pdrop, name="drop")(x, deterministic=deterministic)
        x, new_cache = GPT2Blocks(cfg, name="h", **kw)(x, mask, deterministic, cache, index)
        x = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_f", **kw)(x)
        return x, wte, new_cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head; ``apply`` returns logits (batch, len, vocab).

    Args (of ``__call__``):
      input_ids: int (batch, len).
      attention_mask: optional (batch, len) of 1 for tokens and 0 for padding; padded keys
        are never attended to. With a cache it covers the new tokens only.
      position_ids: optional int (batch, len); defaults to ``arange(len)`` (offset by the
        cache index when decoding), as transformers does.
      cache: optional KV cache from :meth:`init_cache`; then ``apply`` returns
        ``(logits, new_cache)``. The cache follows the contract of
        :mod:`jlora.models.generate`.
      deterministic: ``False`` turns dropout on (needs a ``'dropout'`` rng).

    Example:
      >>> import jax
      >>> cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
      >>> model = GPT2LMHeadModel(cfg)
      >>> ids = jnp.zeros((1, 4), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)
      >>> model.apply(params, ids).shape
      (1, 4, 11)
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> dict:
        """An empty KV cache: per layer (keys, values) of (batch, max_length, heads, head_dim).

        Args:
          batch_size: rows decoded together.
          max_length: prompt plus generated tokens, at most ``n_positions``.
          dtype: cache dtype; defaults to the model's compute dtype.

        Returns:
          ``{'index': int32[], 'mask': bool[batch, max_length], 'layers': {'0': {'key': k,
          'value': v}, ...}}`` as :mod:`jlora.models.generate` specifies.

        Raises:
          JloraError: ``max_length`` exceeds ``n_positions`` (GPT-2 has no positions past it).
        """
        cfg = self.config
        if max_length > cfg.n_positions:
            raise JloraError(
                f"max_length={max_length} exceeds GPT-2's n_positions={cfg.n_positions}; "
                "generate fewer tokens or use a shorter prompt."
            )
        return common.empty_cache(
            batch_size, max_length, cfg.n_layer, cfg.n_head, cfg.head_dim, dtype or self.dtype
        )

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: dict | None = None,
        deterministic: bool = True,
    ):
        cfg = self.config
        b, t = input_ids.shape
        index, key_valid, q_slots, k_slots = common.cache_slots(input_ids, attention_mask, cache)
        if position_ids is None:
            position_ids = jnp.broadcast_to(q_slots, (b, t))
        causal = (q_slots[:, None] >= k_slots[None, :])[None, None]
        mask = causal & key_valid[:, None, None, :]
        trunk = GPT2Model(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="transformer")
        layers = None if cache is None else cache["layers"]
        x, wte, new_layers = trunk(input_ids, mask, position_ids, deterministic, layers, index)
        if cfg.tie_word_embeddings:
            logits = wte.attend(x)
        else:
            head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
            )
            logits = head(x)
        if cache is None:
            return logits
        return logits, {"index": index + t, "mask": key_valid, "layers": new_layers}


# --------------------------------------------------------------------------- name map

_PREFIX = "transformer."
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_LAYER_NORMS = ("ln_1", "ln_2", "ln_f")
_EMBEDS = ("wte", "wpe")


def _hf_to_params(name: str, array: np.ndarray) -> tuple[ParamPath, np.ndarray] | None:
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), array.T  # a view: hf.load checks shapes on placeholders
    if not name.startswith(_PREFIX):  # original OpenAI-era checkpoints carry no prefix
        name = _PREFIX + name
    if name.endswith(_BUFFER_SUFFIXES):
        return None
    *module, leaf = name.split(".")
    if leaf == "weight":
        last = module[-1]
        leaf = "embedding" if last in _EMBEDS else "scale" if last in _LAYER_NORMS else "kernel"
    elif leaf != "bias":
        return None
    return (*module, leaf), array


def _params_to_hf(path: ParamPath, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    *module, leaf = path
    if leaf == "kernel" and module != ["lm_head"]:  # Conv1D: (in, out), no transpose
        return [(".".join((*module, "weight")), array)]
    return common.linear_params_to_hf("GPT-2", path, array)


def _expected_hf_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    cfg = GPT2Config.from_hf(hf_config)
    d, inner = cfg.n_embd, cfg.inner_dim
    shapes = {
        f"{_PREFIX}wte.weight": (cfg.vocab_size, d),
        f"{_PREFIX}wpe.weight": (cfg.n_positions, d),
    }
    shapes |= {f"{_PREFIX}ln_f.weight": (d,), f"{_PREFIX}ln_f.bias": (d,)}
    for i in range(cfg.n_layer):
        for m, fan_in, fan_out in [  # Conv1D weights are (in, out)
            ("ln_1", None, d),
            ("attn.c_attn", d, 3 * d),
            ("attn.c_proj", d, d),
            ("ln_2", None, d),
            ("mlp.c_fc", d, inner),
            ("mlp.c_proj", inner, d),
        ]:
            p = f"{_PREFIX}h.{i}.{m}"
            shapes[f"{p}.weight"] = (fan_out,) if fan_in is None else (fan_in, fan_out)
            shapes[f"{p}.bias"] = (fan_out,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _build(hf_config: Mapping[str, Any], dtype: Any = None) -> GPT2LMHeadModel:
    return common.build(GPT2LMHeadModel, GPT2Config.from_hf(hf_config), dtype)


def _example_inputs(hf_config: Mapping[str, Any]) -> tuple:
    return common.example_ids(GPT2Config.from_hf(hf_config).n_positions)


SPEC = ArchSpec(
    model_types=("gpt2",),
    check_config=GPT2Config.from_hf,
    num_layers=lambda hf_config: GPT2Config.from_hf(hf_config).n_layer,
    build=_build,
    hf_to_params=_hf_to_params,
    params_to_hf=_params_to_hf,
    expected_hf_shapes=_expected_hf_shapes,
    auto_class="AutoModelForCausalLM",
    example_inputs=_example_inputs,
    fan_in_fan_out=("c_attn", "c_proj", "c_fc"),
)
