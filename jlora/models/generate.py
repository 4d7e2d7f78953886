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
