"""The default loss: causal-LM cross-entropy for jlora's decoder models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora import paths as P
from jlora.forward import ALL_ADAPTERS, lora
from jlora.train.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100

LossFn = Callable[[Any, Any, jax.Array | None], tuple[jax.Array, dict[str, Any]]]


def _has_head_method(apply_fn: Callable) -> bool:
    """Whether ``apply_fn`` is the ``apply`` of a model with a ``hidden_and_head`` method
    (jlora's Llama-family decoders)."""
    return callable(getattr(getattr(apply_fn, "__self__", None), "hidden_and_head", None))


def _head_adapted(apply_fn: Callable, params: Any) -> bool:
    """Whether the output head carries adapter leaves (``lm_head``, or the embedding a tied
    head reads): the chunked loss reads the head's kernel as it is, so such a model takes the
    logits path, where :func:`jlora.lora` runs the head's adapter. Decided at trace time."""
    tree = P.params_of(params)
    tied = getattr(getattr(apply_fn.__self__, "config", None), "tie_word_embeddings", False)
    head = tree.get("model", {}).get("embed_tokens", {}) if tied else tree.get("lm_head", {})
    return any(P.is_adapter_name(str(k)) for k in head)


def causal_lm_loss(apply_fn: Callable, *, dropout: float = 0.0, chunk_size: int | None = 2048,
                   adapter: Any = ALL_ADAPTERS, **apply_kwargs: Any) -> LossFn:
    """A ``loss_fn(params, batch, rng) -> (loss, aux)`` for a decoder LM.

    Runs ``jlora.lora(apply_fn)`` on ``batch['input_ids']`` (with ``attention_mask`` when the
    batch has one) and returns the mean shifted cross-entropy (position ``t`` predicts token
    ``t + 1``, computed in float32) over the counted targets, and ``aux = {'tokens': n}``.

    When ``apply_fn`` is the ``apply`` of a model with a ``hidden_and_head`` method (jlora's
    Llama-family decoders: final hidden states and the head's kernel), the loss never forms
    the logits of the whole batch: the head and the cross-entropy run ``chunk_size`` tokens
    at a time (:func:`jlora.train.cross_entropy.linear_cross_entropy`, which also computes
    their gradients in the same pass, so nothing is recomputed), unless the head itself
    carries an adapter. Other models return logits; the loss then reads them in place (the
    shift is on the targets: no copy of the logits).
    A target counts when its ``attention_mask`` (if any) and ``loss_mask`` (if any) are set
    and its label is not ``-100``; labels are ``batch['labels']`` if given (HF convention,
    not shifted) else the input ids. The train step weights micro-batches by ``tokens``, so
    gradient accumulation gives the token mean of the whole batch.

    Args:
      apply_fn: the model's ``apply`` (``logits = apply_fn(params, input_ids, ...)``), or
        a Flax NNX ``graphdef`` (the step's rng then goes to ``dropout_rng``).
      dropout: the adapters' dropout (``config.dropout``); active when the step passes a rng.
      chunk_size: tokens per chunk of the head + cross-entropy (``None``: the whole batch at
        once, through the model's logits).
      adapter: the adapters that run (:func:`jlora.lora`'s ``adapter``: a name, several, or
        ``None``); every adapter in the tree by default. A batch with ``'adapter_ids'`` (int,
        one per example, indexing :func:`jlora.adapter_names`, −1 for none) is a mixed
        batch: each example runs (and trains) its own adapter.
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
    forward = lora(apply_fn, dropout=dropout, adapter=adapter)
    chunked = chunk_size is not None and _has_head_method(apply_fn)

    def loss_fn(params: Any, batch: Any, rng: jax.Array | None):
        ids = batch["input_ids"]
        fwd = forward if "adapter_ids" not in batch else lora(
            apply_fn, dropout=dropout, adapter=batch["adapter_ids"])
        kwargs = dict(apply_kwargs)
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if rng is not None and dropout > 0:
            if getattr(forward, "_jlora_nnx", False):  # Flax NNX: jlora.lora(graphdef)
                kwargs["dropout_rng"] = rng
            else:
                kwargs["rngs"] = {"dropout": rng}
        labels = batch.get("labels", ids)
        mask = labels != IGNORE_INDEX
        for name in ("attention_mask", "loss_mask"):
            if name in batch:
                mask = mask & (batch[name] > 0)
        # position t predicts token t + 1; the last position predicts nothing (weight 0)
        last = jnp.zeros_like(mask[:, :1])
        weights = jnp.concatenate([mask[:, 1:], last], axis=1).astype(jnp.float32)
        targets = jnp.concatenate([jnp.where(mask, labels, 0)[:, 1:], last.astype(labels.dtype)],
                                  axis=1)
        tokens = weights.sum()
        if chunked and not _head_adapted(apply_fn, params):
            h, head = fwd(params, ids, method="hidden_and_head", **kwargs)
            total = linear_cross_entropy(h, head, targets, weights, chunk_size)
        else:
            logits = fwd(params, ids, **kwargs)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), targets)
            total = (ce * weights).sum()
        return total / jnp.maximum(tokens, 1.0), {"tokens": tokens}

    return loss_fn
