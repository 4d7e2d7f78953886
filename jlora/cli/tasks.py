"""The two tasks of ``jlora finetune``: their loss (for :func:`jlora.train.make_train_step`)
and their held-out evaluation.

* causal-lm: :func:`jlora.train.causal_lm_loss`; evaluation reports the token-mean loss and
  its perplexity.
* embedding: sentence embeddings as sentence-transformers computes them (mean pooling, unit
  norm), trained with the symmetric in-batch contrastive loss (each query's positive is its
  own document; the batch's other documents are the negatives, and the other way round);
  evaluation ranks every held-out document for every held-out query: recall@1 and MRR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.cli.data import Arrays, eval_batches
from jlora.forward import lora
from jlora.models.pooling import sentence_embeddings
from jlora.optim import combine
from jlora.train import causal_lm_loss, shard_batch
from jlora.train.mesh import batch_axes

PAIR_SIDES = ("query", "document")


def embed_fn(model: Any, *, dropout: float = 0.0) -> Callable:
    """``embed(params, input_ids, attention_mask, token_type_ids, rng=None)``: unit-norm
    sentence embeddings with the adapters running (dropout when ``rng`` is given)."""
    forward = lora(model.apply, dropout=dropout)

    def embed(params, input_ids, attention_mask, token_type_ids, rng=None):
        def apply(v, *args, **kwargs):
            if rng is not None and dropout > 0:
                kwargs["rngs"] = {"dropout": rng}
            return forward(v, *args, **kwargs)

        return sentence_embeddings(model, params, input_ids, attention_mask, token_type_ids,
                                   apply_fn=apply)

    return embed


def contrastive_loss(model: Any, *, dropout: float, temperature: float) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, aux)`` for query/document pair batches.

    Queries and documents run through the model as one batch of 2B rows; the loss is the
    mean of the query->document and document->query cross-entropies over
    ``q @ d.T / temperature``.
    """
    embed = embed_fn(model, dropout=dropout)

    def loss_fn(params, batch, rng):
        both = {k: jnp.concatenate([batch[f"query_{k}"], batch[f"document_{k}"]])
                for k in ("input_ids", "attention_mask", "token_type_ids")}
        e = embed(params, both["input_ids"], both["attention_mask"], both["token_type_ids"],
                  rng)
        q, d = jnp.split(e, 2)
        logits = (q @ d.T).astype(jnp.float32) / temperature
        labels = jnp.arange(q.shape[0])
        ce = optax.softmax_cross_entropy_with_integer_labels
        return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean()), {}

    return loss_fn


def make_loss(task: str, model: Any, *, dropout: float, temperature: float) -> Callable:
    if task == "causal-lm":
        return causal_lm_loss(model.apply, dropout=dropout)
    return contrastive_loss(model, dropout=dropout, temperature=temperature)


def make_evaluate(task: str, model: Any, arrays: Arrays, batch_size: int,
                  sharding: Any) -> Callable[[Any, Any], dict[str, float]]:
    """``evaluate(trainable, frozen) -> metrics`` on the held-out ``arrays``.

    Batches are laid out like training batches (``sharding``); ``batch_size`` is rounded up
    to a multiple of the data-parallel size.
    """
    data_size = math.prod(sharding.mesh.shape[a] for a in batch_axes(sharding.mesh))
    batch_size = -(-batch_size // data_size) * data_size
    if task == "causal-lm":
        loss_fn = causal_lm_loss(model.apply)

        @jax.jit
        def batch_loss(trainable, frozen, batch):
            loss, aux = loss_fn(combine(trainable, frozen), batch, None)
            return loss * aux["tokens"], aux["tokens"]

        def evaluate(trainable, frozen):
            total = count = 0.0
            for batch, _ in eval_batches(arrays, batch_size):
                s, n = batch_loss(trainable, frozen, shard_batch(batch, sharding))
                total, count = total + float(s), count + float(n)
            loss = total / max(count, 1.0)
            return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}

        return evaluate

    embed = embed_fn(model)

    @jax.jit
    def batch_embed(trainable, frozen, ids, mask, types):
        return embed(combine(trainable, frozen), ids, mask, types)

    def evaluate(trainable, frozen):
        out = {}
        for side in PAIR_SIDES:
            part = {k.removeprefix(f"{side}_"): v for k, v in arrays.items()
                    if k.startswith(f"{side}_")}
            chunks = []
            for batch, real in eval_batches(part, batch_size):
                b = shard_batch(batch, sharding)
                e = batch_embed(trainable, frozen, b["input_ids"], b["attention_mask"],
                                b["token_type_ids"])
                chunks.append(np.asarray(e)[:real])
            out[side] = np.concatenate(chunks)
        return retrieval_metrics(out["query"], out["document"])

    return evaluate


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray) -> dict[str, float]:
    """recall@1 and MRR of ranking every document for every query (the i-th is right).

    Example:
      >>> q = np.eye(3, dtype=np.float32)
      >>> d = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], np.float32)
      >>> {k: round(v, 3) for k, v in retrieval_metrics(q, d).items()}
      {'eval_recall@1': 0.333, 'eval_mrr': 0.667}
    """
    sims = queries.astype(np.float32) @ documents.astype(np.float32).T
    right = np.diag(sims)
    rank = 1 + (sims > right[:, None]).sum(axis=1)
    return {"eval_recall@1": float(np.mean(rank == 1)), "eval_mrr": float(np.mean(1.0 / rank))}


# the metric that decides early stopping and the best checkpoint, and whether higher is better
TARGET_METRIC = {"causal-lm": ("eval_loss", False), "embedding": ("eval_recall@1", True)}
