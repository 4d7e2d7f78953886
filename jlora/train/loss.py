"""The default loss: causal-LM cross-entropy for jlora's decoder models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.forward import lora

IGNORE_INDEX = -100

LossFn = Callable[[Any, Any, jax.Array | None], tuple[jax.Array, dict[str, Any]]]


def causal_lm_loss(apply_fn: Callable, *, dropout: float = 0.0, **apply_kwargs: Any) -> LossFn:
    """A ``loss_fn(params, batch, rng) -> (loss, aux)`` for a decoder LM.

    Runs ``jlora.lora(apply_fn)`` on ``batch['input_ids']`` (with ``attention_mask`` when the
    batch has one) and returns the mean shifted cross-entropy (position ``t`` predicts token
    ``t + 1``, computed in float32) over the counted targets, and ``aux = {'tokens': n}``.
    A target counts when its ``attention_mask`` (if any) and ``loss_mask`` (if any) are set
    and its label is not ``-100``; labels are ``batch['labels']`` if given (HF convention,
    not shifted) else the input ids. The train step weights micro-batches by ``tokens``, so
    gradient accumulation gives the token mean of the whole batch.

    Args:
      apply_fn: the model's ``apply`` (``logits = apply_fn(params, input_ids, ...)``).
      dropout: the adapters' dropout (``config.dropout``); active when the step passes a rng.
      **apply_kwargs: extra keyword arguments for ``apply_fn``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> class LM(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, ids, attention_mask=None):
      ...         return nn.Dense(5)(nn.Embed(5, 4)(ids))
      >>> ids = jnp.array([[1, 2, 3, 4]])
      >>> p = LM().init(jax.random.key(0), ids)
      >>> loss, aux = causal_lm_loss(LM().apply)(p, {"input_ids": ids}, None)
      >>> int(aux["tokens"])
      3
    """
    forward = lora(apply_fn, dropout=dropout)

    def loss_fn(params: Any, batch: Any, rng: jax.Array | None):
        ids = batch["input_ids"]
        kwargs = dict(apply_kwargs)
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if rng is not None and dropout > 0:
            kwargs["rngs"] = {"dropout": rng}
        logits = forward(params, ids, **kwargs)
        labels = batch.get("labels", ids)
        mask = labels != IGNORE_INDEX
        for name in ("attention_mask", "loss_mask"):
            if name in batch:
                mask = mask & (batch[name] > 0)
        targets = jnp.where(mask, labels, 0)[:, 1:]
        mask = mask[:, 1:].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), targets)
        tokens = mask.sum()
        return (ce * mask).sum() / jnp.maximum(tokens, 1.0), {"tokens": tokens}

    return loss_fn
