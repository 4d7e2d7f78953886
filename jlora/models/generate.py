"""Greedy and sampled generation with a KV cache for jlora's decoder models.

The KV-cache contract
=====================

Every decoder (``jlora.models.llama``, ``jlora.models.gpt2``) follows it, so that
:func:`generate` works with any of them and with any wrapper of ``model.apply`` that keeps
its signature (``jlora.lora(model.apply)`` runs the adapters while generating).

1. ``model.init_cache(batch_size, max_length, dtype=None) -> cache`` is a plain method (no
   params needed, works on the unbound module) that returns an empty cache: a pytree of
   arrays with a fixed shape, so a jitted decode step compiles once. Layout used by jlora's
   models (generate never looks inside; only the model reads it)::

       {"index": int32[],                  # slots already filled (same for every row)
        "mask":  bool[batch, max_length],  # True where a slot holds a real (non-pad) token
        "layers": {"0": {"key":   [batch, max_length, num_kv_heads, head_dim],
                         "value": [batch, max_length, num_kv_heads, head_dim]},
                   "1": {...}, ...}}       # one entry per decoder block, named like it

   ``dtype`` defaults to the model's compute dtype.
2. ``apply_fn(variables, input_ids, attention_mask=None, position_ids=None, cache=None)``:

   * without ``cache`` it returns ``logits`` ``[batch, seq, vocab]`` (the training forward;
     ``attention_mask`` ``[batch, seq]`` marks real tokens, 0 for padding);
   * with ``cache`` it returns ``(logits, new_cache)``. ``input_ids`` ``[batch, t]`` are
     written to slots ``[index, index + t)``; ``attention_mask`` ``[batch, t]`` covers the
     **new tokens only** (the cache remembers the earlier ones in ``mask``) and defaults to
     ones; ``position_ids`` ``[batch, t]`` default to ``index + arange(t)`` (as transformers
     does without a mask). Token ``index + j`` attends to filled, unmasked slots ``<= index
     + j``. The caller keeps ``index + t <= max_length``.
3. Positions for a left-padded batch are ``cumsum(attention_mask) - 1`` (pads at 0), as in
   transformers' ``generate``; :func:`generate` computes them, so a model only has to honour
   the ``position_ids`` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora.errors import JloraError

__all__ = ["generate", "sample_logits"]


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Picks one token per row of ``logits`` ``[batch, vocab]``.

    Greedy (argmax) when ``rng`` is None; otherwise samples after temperature, top-k and
    top-p (nucleus) filtering, in transformers' order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> sample_logits(jnp.array([[0.0, 3.0, 1.0]])).tolist()
      [1]
      >>> sample_logits(jnp.array([[0.0, 3.0, 1.0]]), jax.random.key(0), top_k=1).tolist()
      [1]
    """
    if rng is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always the most likely token)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate(apply_fn, init_cache, max_new_tokens, settings, variables, ids, mask, rng):
    temperature, top_k, top_p, eos, pad = settings
    batch, length = ids.shape
    cache = init_cache(batch, length + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = apply_fn(
        variables, ids, attention_mask=mask, position_ids=positions, cache=cache
    )
    next_pos = jnp.sum(mask, axis=-1)
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)

    def pick(logits, i, rng):
        key = None if rng is None else jax.random.fold_in(rng, i)
        return sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

    def body(i, state):
        out, done, logits, cache, pos = state
        token = pick(logits, i, rng)
        token = jnp.where(done, pad, token)
        out = out.at[:, i].set(token)
        if eos:
            done = done | jnp.isin(token, jnp.asarray(eos))
        logits, cache = apply_fn(
            variables,
            token[:, None],
            attention_mask=jnp.ones((batch, 1), mask.dtype),
            position_ids=pos[:, None],
            cache=cache,
        )
        return out, done, logits[:, -1], cache, pos + 1

    done = jnp.zeros((batch,), bool)
    state = (out, done, logits[:, -1], cache, next_pos)
    if max_new_tokens > 1:
        state = jax.lax.fori_loop(0, max_new_tokens - 1, body, state)
    out, done, logits = state[0], state[1], state[2]
    last = jnp.where(done, pad, pick(logits, max_new_tokens - 1, rng))
    out = out.at[:, -1].set(last)
    return jnp.concatenate([ids.astype(jnp.int32), out], axis=1)


_COMPILED: dict[Any, Callable] = {}


def generate(
    apply_fn: Callable,
    variables: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    init_cache: Callable[[int, int], Any],
    max_new_tokens: int,
    do_sample: bool = False,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens per row with a KV cache, in one jitted call.

    The prompt runs once (prefill), then one token at a time (decode) inside a
    ``lax.fori_loop``; compiled functions are cached per ``apply_fn``/``init_cache`` and
    settings. Rows that produced an EOS token go on with ``pad_token_id``.

    Args:
      apply_fn: ``model.apply`` or a wrapper with its signature, e.g.
        ``jlora.lora(model.apply)`` to generate with the adapters active (module contract).
      variables: ``{'params': ...}`` for ``apply_fn``.
      input_ids: ``[batch, seq]`` int prompt; left-pad rows of different lengths.
      attention_mask: ``[batch, seq]``, 0 on padding; default all ones.
      init_cache: ``model.init_cache``.
      max_new_tokens: tokens to add to each row.
      do_sample: sample (needs ``rng``) instead of greedy argmax.
      rng: a ``jax.random.key`` for sampling.
      temperature, top_k, top_p: sampling filters, as in transformers.
      eos_token_id: token id(s) that end a row.
      pad_token_id: written after a row ended.

    Returns:
      ``[batch, seq + max_new_tokens]`` int32: the prompt followed by the new tokens, like
      transformers' ``generate``.

    Raises:
      JloraError: ``do_sample`` without ``rng``, or ``max_new_tokens < 1``.
    """
    if max_new_tokens < 1:
        raise JloraError(f"max_new_tokens={max_new_tokens}: ask for at least 1 token")
    if do_sample and rng is None:
        raise JloraError("do_sample=True needs rng=jax.random.key(seed)")
    if temperature <= 0:
        raise JloraError(f"temperature={temperature} must be > 0; use do_sample=False for greedy")
    input_ids = jnp.asarray(input_ids)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    eos = () if eos_token_id is None else tuple(jnp.atleast_1d(jnp.asarray(eos_token_id)).tolist())
    settings = (float(temperature), top_k, top_p, eos, int(pad_token_id))
    key = (apply_fn, init_cache, int(max_new_tokens), settings, do_sample)
    try:
        fn = _COMPILED.get(key)
    except TypeError:  # an unhashable apply_fn: compile for this call only
        key, fn = None, None
    if fn is None:

        def fn(variables, ids, mask, rng):
            return _generate(
                apply_fn, init_cache, max_new_tokens, settings, variables, ids, mask, rng
            )

        fn = jax.jit(fn)
        if key is not None:
            if len(_COMPILED) > 32:
                _COMPILED.clear()
            _COMPILED[key] = fn
    return fn(variables, input_ids, mask, rng if do_sample else None)
