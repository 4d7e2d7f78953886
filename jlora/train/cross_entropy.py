"""Cross-entropy through the output head, a chunk of tokens at a time.

``linear_cross_entropy(h, w, targets, weights)`` is ``sum_i weights[i] * CE(h[i] @ w,
targets[i])`` without ever holding the logits of all tokens: the tokens go through the
head ``chunk_size`` at a time (a ``lax.scan``), and the forward pass also computes the
gradients (``softmax - onehot`` of the chunk times ``w.T``, and ``h.T`` times it when ``w``
is differentiated), so the backward pass only scales them: no logits are recomputed and the
step does the same matmuls as the plain ``logits = h @ w`` path, in the same dtypes (logits
cast to float32 before the softmax, as ``causal_lm_loss`` always did).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(h, targets, weights, chunk: int):
    """Pads the sequence axis (1) to a multiple of ``chunk`` positions (weight 0) and moves
    the chunks to a leading axis: (chunks, batch, chunk, ...). The batch axis stays whole, so
    a batch sharded over devices stays sharded."""
    s = h.shape[1]
    pad = -s % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    b, k = h.shape[0], (s + pad) // chunk
    split = lambda x: x.reshape(b, k, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    return split(h), split(targets), split(weights)


def _chunk_loss(hc, w, tc, wc):
    logits = jnp.dot(hc, w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return logits, lse, jnp.sum((lse - picked) * wc)


def _loss(h, w, targets, weights, chunk):
    def body(total, xs):
        return total + _chunk_loss(xs[0], w, xs[1], xs[2])[2], None

    return jax.lax.scan(body, jnp.float32(0.0), _chunks(h, targets, weights, chunk))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lce(h, w, targets, weights, chunk):
    return _loss(h, w, targets, weights, chunk)


def _lce_fwd(h, w, targets, weights, chunk):
    want_w = w.perturbed
    h, w, targets, weights = h.value, w.value, targets.value, weights.value
    logits_dtype = jnp.result_type(h, w)

    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        logits, lse, loss = _chunk_loss(hc, w, tc, wc)
        probs = jnp.exp(logits - lse[..., None])
        onehot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        dlogits = ((probs - onehot) * wc[..., None]).astype(logits_dtype)
        dh = jnp.dot(dlogits, w.T).astype(h.dtype)
        if want_w:
            dw = dw + jnp.einsum("bcd,bcv->dv", hc, dlogits).astype(dw.dtype)
        return (total + loss, dw), dh

    dw0 = jnp.zeros(w.shape, w.dtype) if want_w else None
    (total, dw), dhs = jax.lax.scan(body, (jnp.float32(0.0), dw0),
                                    _chunks(h, targets, weights, chunk))
    b, s = h.shape[:2]
    dh = dhs.swapaxes(0, 1).reshape(b, -1, h.shape[2])[:, :s]
    return total, (dh, dw)


def _lce_bwd(chunk, res, g):
    dh, dw = res
    g = g.astype(jnp.float32)
    scale = lambda x: None if x is None else (x.astype(jnp.float32) * g).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, None


_lce.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)


def linear_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                         chunk_size: int = 1024) -> jax.Array:
    """``sum weights * CE(h @ w, targets)`` over (batch, position), a chunk of positions at a
    time.

    Args:
      h: (batch, positions, features) hidden states, in the compute dtype.
      w: (features, vocab) the output head's kernel (a tied head: the embedding transposed).
      targets: (batch, positions) int target ids (any value where ``weights`` is 0).
      weights: (batch, positions) float32 weight of each token's loss (0 drops it).
      chunk_size: tokens per chunk (``chunk_size // batch`` positions of every row, at least
        one): the largest temporaries are a few (chunk, vocab) float32 arrays.

    Returns:
      The weighted sum of the tokens' cross-entropies (float32 scalar), differentiable in
      ``h`` and ``w`` (the gradient w.r.t. ``w`` is only computed when it is needed).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> h = jax.random.normal(jax.random.key(0), (2, 5, 4))
      >>> w = jax.random.normal(jax.random.key(1), (4, 7))
      >>> t = jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]]); wt = jnp.ones((2, 5))
      >>> ref = optax.softmax_cross_entropy_with_integer_labels(h @ w, t).sum()
      >>> bool(jnp.allclose(linear_cross_entropy(h, w, t, wt, chunk_size=4), ref))
      True
    """
    chunk = max(1, min(int(chunk_size) // h.shape[0], h.shape[1]))
    return _lce(h, w, targets.astype(jnp.int32), weights.astype(jnp.float32), chunk)


__all__ = ["linear_cross_entropy"]
