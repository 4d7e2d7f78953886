"""Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

That model is ``Transformer -> Pooling(mean) -> Normalize``: the token states of a
:class:`jlora.models.bert.BertModel` are averaged over the real (unpadded) tokens and the
result is scaled to unit L2 norm. The embedding of a sentence does not depend on how much
padding its batch has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora.paths import is_variables

__all__ = ["mean_pool", "normalize", "sentence_embeddings"]


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the token states over the positions where ``attention_mask`` is nonzero.

    As sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)``: the token count is
    clamped at 1e-9, so an all-padding row gives zeros rather than NaN.

    Args:
      hidden: (batch, len, features) token states.
      attention_mask: (batch, len), 1 for real tokens and 0 for padding.

    Returns:
      (batch, features) in ``hidden``'s dtype.

    Example:
      >>> h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
      >>> mean_pool(h, jnp.array([[1, 1, 0]]))
      Array([[2., 3.]], dtype=float32)
    """
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
    count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
    return (total / count).astype(hidden.dtype)


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scales the last axis to unit L2 norm (``torch.nn.functional.normalize``).

    Args:
      x: (..., features).
      eps: lower bound of the norm, so a zero vector stays zero.

    Returns:
      ``x / max(||x||, eps)`` with ``x``'s shape and dtype.

    Example:
      >>> normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
      Array([[0.6, 0.8],
             [0. , 0. ]], dtype=float32)
    """
    x32 = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x32, axis=-1, keepdims=True)
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def sentence_embeddings(
    model: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
    *,
    apply_fn: Callable[..., Any] | None = None,
) -> jax.Array:
    """Unit-norm mean-pooled sentence embeddings of an encoder such as all-MiniLM-L6-v2.

    Args:
      model: a :class:`jlora.models.bert.BertModel` (anything whose ``apply`` takes
        ``(variables, input_ids, attention_mask, token_type_ids)`` and returns the token
        states or an object with ``last_hidden_state``).
      params: what ``model.init`` returns (``{'params': ...}``), or the bare params tree.
      input_ids: int (batch, len) from the checkpoint's tokenizer.
      attention_mask: (batch, len), 1 for real tokens and 0 for padding.
      token_type_ids: optional int (batch, len); zeros by default.
      apply_fn: runs the model instead of ``model.apply``, e.g. ``jlora.lora(model.apply)``
        for a tree with adapters.

    Returns:
      float32 (batch, hidden) embeddings of unit L2 norm; their dot products are cosine
      similarities.

    Example:
      >>> from jlora.models.bert import BertConfig, BertModel
      >>> cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
      ...                  num_attention_heads=2, intermediate_size=16,
      ...                  max_position_embeddings=8)
      >>> model = BertModel(cfg)
      >>> ids = jnp.array([[2, 5, 3, 0], [2, 7, 3, 0]])
      >>> mask = (ids > 0).astype(jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)
      >>> emb = sentence_embeddings(model, params, ids, mask)
      >>> emb.shape, bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0))
      ((2, 8), True)
    """
    variables = params if is_variables(params) else {"params": params}
    fn = model.apply if apply_fn is None else apply_fn
    out = fn(variables, input_ids, attention_mask, token_type_ids)
    hidden = getattr(out, "last_hidden_state", out)
    return normalize(mean_pool(hidden, attention_mask).astype(jnp.float32))
