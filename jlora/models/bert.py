"""BERT as a Flax linen encoder with ``transformers.BertModel`` parity (``AutoModel``).

Param paths equal the transformers module names of ``BertModel``
(``encoder.layer.0.attention.self.query``, ``embeddings.LayerNorm``, ``pooler.dense``), so
PEFT ``target_modules`` such as ``["query", "value"]`` carry over unchanged. The name map
reads checkpoints with or without the ``bert.`` prefix that task heads add
(``BertForMaskedLM``...), drops the heads and buffers, and writes what ``BertModel`` saves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import schema
from jlora.models import common
from jlora.models.base import ArchSpec, ParamPath

__all__ = ["BertConfig", "BertModel", "BertOutput", "SPEC"]

_ACTIVATIONS = common.activations(
    "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh"
)


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` that change the math.

    Example:
      >>> sizes = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
      >>> BertConfig.from_hf({**sizes, "intermediate_size": 64}).head_dim
      8
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    add_pooling_layer: bool = True

    def __post_init__(self):
        common.check_heads("BERT", self, "hidden_size", "num_attention_heads")
        common.check_activation("BERT", self, "hidden_act", _ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """Reads a ``config.json`` dict: the fields this model uses, checked, and those that
        would switch on what it does not implement (relative positions, a decoder...).

        Raises:
          HFError: naming ``source``, the field and the fix.
        """
        return common.dataclass_from_hf(
            cls, hf_config, _FIELDS, source, ("hidden_size", "num_attention_heads")
        )


# The config.json fields the model reads (or that change its math), with transformers' defaults.
_FIELDS: dict[str, schema.Field] = {
    "vocab_size": schema.integer(),
    "hidden_size": schema.integer(),
    "num_hidden_layers": schema.integer(),
    "num_attention_heads": schema.integer(),
    "intermediate_size": schema.integer(),
    "hidden_act": schema.choice(*_ACTIVATIONS, default="gelu"),
    "max_position_embeddings": schema.integer(default=512),
    "type_vocab_size": schema.integer(default=2),
    "layer_norm_eps": schema.float32(default=1e-12),
    "hidden_dropout_prob": schema.number(0, 1, default=0.1),
    "attention_probs_dropout_prob": schema.number(0, 1, default=0.1),
    "add_pooling_layer": schema.boolean(default=True),
    "position_embedding_type": schema.choice(
        "absolute",
        default="absolute",
        null=True,
        want="'absolute' (jlora's BERT has absolute position embeddings only)",
        fix="use transformers for relative position embeddings",
    ),
    "is_decoder": schema.unsupported(
        "jlora's BERT is an encoder", "use transformers for BERT as a decoder"
    ),
    "add_cross_attention": schema.unsupported(
        "jlora's BERT has no cross-attention", "use transformers for BERT as a decoder"
    ),
    **common.UNSUPPORTED,
}


class BertOutput(NamedTuple):
    """What :class:`BertModel` returns.

    Attributes:
      last_hidden_state: (batch, len, hidden).
      pooler_output: (batch, hidden), ``tanh(dense(h[:, 0]))``; ``None`` without a pooler.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


class _Module(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, name=name, **self._kw())

    def _norm(self, name: str = "LayerNorm") -> nn.LayerNorm:
        return nn.LayerNorm(self.config.layer_norm_eps, name=name, **self._kw())

    def _dropout(self, rate: float, x, deterministic: bool):
        return nn.Dropout(rate)(x, deterministic=deterministic)


class BertEmbeddings(_Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True):
        cfg, kw = self.config, self._kw()
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)(input_ids)
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw
        )
        typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings", **kw)
        x = x + typ(token_type_ids) + pos(position_ids)
        return self._dropout(cfg.hidden_dropout_prob, self._norm()(x), deterministic)


class BertSelfAttention(_Module):
    """``query``, ``key``, ``value`` projections and masked softmax attention."""

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        cfg = self.config
        b, t, _ = x.shape
        heads = lambda name: self._dense(cfg.hidden_size, name)(x).reshape(
            b, t, cfg.num_attention_heads, cfg.head_dim
        )
        q, k, v = heads("query"), heads("key"), heads("value")
        w = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
        drop = lambda w: self._dropout(cfg.attention_probs_dropout_prob, w, deterministic)
        return common.softmax_attend(w, v, mask, drop).reshape(b, t, cfg.hidden_size)


class BertResidual(_Module):
    """``dense`` -> dropout -> ``LayerNorm(y + residual)`` (BertSelfOutput / BertOutput)."""

    @nn.compact
    def __call__(self, x, residual, deterministic=True):
        y = self._dense(self.config.hidden_size, "dense")(x)
        y = self._dropout(self.config.hidden_dropout_prob, y, deterministic)
        return self._norm()(y + residual)


class BertAttention(_Module):
    """``self`` attention followed by its ``output`` block."""

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        y = BertSelfAttention(self.config, name="self", **self._kw())(x, mask, deterministic)
        return BertResidual(self.config, name="output", **self._kw())(y, x, deterministic)


class BertIntermediate(_Module):
    """``dense`` up-projection and activation."""

    @nn.compact
    def __call__(self, x):
        y = self._dense(self.config.intermediate_size, "dense")(x)
        return _ACTIVATIONS[self.config.hidden_act](y)


class BertLayer(_Module):
    """``attention``, ``intermediate``, ``output``."""

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        kw = self._kw()
        h = BertAttention(self.config, name="attention", **kw)(x, mask, deterministic)
        y = BertIntermediate(self.config, name="intermediate", **kw)(h)
        return BertResidual(self.config, name="output", **kw)(y, h, deterministic)


class BertLayers(_Module):
    """The ``layer`` container: layers named ``'0'``, ``'1'``... as in ``nn.ModuleList``."""

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=str(i), **self._kw())(x, mask, deterministic)
        return x


class BertEncoder(_Module):
    """``encoder``: holds ``layer``."""

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        return BertLayers(self.config, name="layer", **self._kw())(x, mask, deterministic)


class BertPooler(_Module):
    """``tanh(dense(h[:, 0]))``."""

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(self._dense(self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(_Module):
    """The BERT encoder; ``apply`` returns a :class:`BertOutput`.

    Args (of ``__call__``):
      input_ids: int (batch, len).
      attention_mask: optional (batch, len) of 1 for tokens and 0 for padding.
      token_type_ids: optional int (batch, len); zeros by default.
      position_ids: optional int (batch, len); ``arange(len)`` by default.
      deterministic: ``False`` turns dropout on (needs a ``'dropout'`` rng).

    Example:
      >>> cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
      ...                  num_attention_heads=2, intermediate_size=16,
      ...                  max_position_embeddings=8)
      >>> model = BertModel(cfg)
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)
      >>> out = model.apply(params, ids, jnp.ones((2, 5), jnp.int32))
      >>> out.last_hidden_state.shape, out.pooler_output.shape
      ((2, 5, 8), (2, 8))
    """

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic: bool = True,
    ) -> BertOutput:
        cfg, kw = self.config, self._kw()
        b, t = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = (attention_mask > 0)[:, None, None, :]
        emb = BertEmbeddings(cfg, name="embeddings", **kw)
        x = emb(input_ids, token_type_ids, position_ids, deterministic)
        x = BertEncoder(cfg, name="encoder", **kw)(x, mask, deterministic)
        pooled = BertPooler(cfg, name="pooler", **kw)(x) if cfg.add_pooling_layer else None
        return BertOutput(x, pooled)


# --------------------------------------------------------------------------- name map

_HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.", "lm_head.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_LINEAR_NAMES = ("query", "key", "value", "dense")


def _hf_to_params(name: str, array: np.ndarray) -> tuple[ParamPath, np.ndarray] | None:
    if name.startswith(_HEAD_PREFIXES):
        return None  # task heads: BertModel (AutoModel) does not have them
    name = name.removeprefix("bert.")
    if name in _BUFFERS:
        return None
    *module, leaf = name.split(".")
    unknown = (*module, leaf), array  # no param has this path: hf.load reports it unexpected
    if not module:
        return unknown
    last = module[-1]
    if leaf in ("gamma", "beta"):  # TF-era LayerNorm names
        leaf = "weight" if leaf == "gamma" else "bias"
    if leaf == "bias":
        return (*module, "bias"), array
    if leaf != "weight":
        return unknown
    if last.endswith("_embeddings"):
        return (*module, "embedding"), array
    if last == "LayerNorm":
        return (*module, "scale"), array
    if last in _LINEAR_NAMES:
        return (*module, "kernel"), array.T  # a view: hf.load checks shapes on placeholders
    return unknown


def _params_to_hf(path: ParamPath, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return common.linear_params_to_hf("BERT", path, array)


def _expected_hf_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    cfg = BertConfig.from_hf(hf_config)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {}

    def module(name, out, inp=None):  # an nn.Linear (out, in) or a LayerNorm (out,)
        shapes[f"{name}.weight"] = (out,) if inp is None else (out, inp)
        shapes[f"{name}.bias"] = (out,)

    for kind, rows in [
        ("word", cfg.vocab_size),
        ("position", cfg.max_position_embeddings),
        ("token_type", cfg.type_vocab_size),
    ]:
        shapes[f"embeddings.{kind}_embeddings.weight"] = (rows, h)
    module("embeddings.LayerNorm", h)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            module(f"{p}attention.self.{m}", h, h)
        module(f"{p}attention.output.dense", h, h)
        module(f"{p}attention.output.LayerNorm", h)
        module(f"{p}intermediate.dense", inter, h)
        module(f"{p}output.dense", h, inter)
        module(f"{p}output.LayerNorm", h)
    if cfg.add_pooling_layer:
        module("pooler.dense", h, h)
    return shapes


def _optional_hf_keys(hf_config: Mapping[str, Any]) -> set[str]:
    # BertForMaskedLM / BertForCausalLM build BertModel(add_pooling_layer=False) and save no
    # pooler; AutoModel then initialises it randomly, and so does hf.load.
    if not BertConfig.from_hf(hf_config).add_pooling_layer:
        return set()
    return {"pooler.dense.weight", "pooler.dense.bias"}


def _build(hf_config: Mapping[str, Any], dtype: Any = None) -> BertModel:
    return common.build(BertModel, BertConfig.from_hf(hf_config), dtype)


def _example_inputs(hf_config: Mapping[str, Any]) -> tuple:
    return common.example_ids(BertConfig.from_hf(hf_config).max_position_embeddings)


SPEC = ArchSpec(
    model_types=("bert",),
    check_config=BertConfig.from_hf,
    num_layers=lambda hf_config: BertConfig.from_hf(hf_config).num_hidden_layers,
    build=_build,
    hf_to_params=_hf_to_params,
    params_to_hf=_params_to_hf,
    expected_hf_shapes=_expected_hf_shapes,
    auto_class="AutoModel",
    example_inputs=_example_inputs,
    optional_hf_keys=_optional_hf_keys,
)
