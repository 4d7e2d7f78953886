"""The adapted layer's pieces, shared by the linen interceptor (:mod:`jlora.forward`) and the
NNX forward (:mod:`jlora.nnx_forward`), one small function per concern (DESIGN.md, "How the
adapted layer grows"):

* geometry: how Dense, DenseGeneral, Einsum, Conv and Embed map their input and kernel to
  2-D matrices and back (:func:`dense_2d`, :func:`einsum_parts`, :func:`base_matmul`,
  :func:`delta`, :func:`embed_delta`, :func:`per_feature`);
* the adapter's kind: LoRA's low-rank term (:func:`low_rank`), DoRA's rescale (:func:`dora`);
* the selection: one adapter per example in a mixed batch (:func:`mixed_delta`);
* the adapter input's dropout from an explicit key (:func:`drop`).

Layer kinds are matched by class: linen's here, NNX's added by :func:`add_layer_kinds` when
:mod:`jlora.nnx_forward` is imported (linen users never import ``flax.nnx``).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jlora import paths as P
from jlora.errors import LayoutError
from jlora.merge import weight_norm

_DROP_BITS = 16


def drop(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """:func:`_dropout`'s masking from an explicit key (shared with the NNX forward)."""
    threshold = round(rate * 2**_DROP_BITS)
    if threshold == 0:
        return x
    # two 16-bit draws from each 32-bit word: half the threefry work of 16-bit bits
    words = jax.random.bits(key, ((x.size + 1) // 2,), jnp.uint32)
    bits = jnp.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:x.size]
    keep = bits.reshape(x.shape) >= jnp.uint32(threshold)
    scale = 1.0 / (1.0 - threshold / 2**_DROP_BITS)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


def free_letter(eq: str) -> str:
    return next(c for c in string.ascii_letters if c not in eq)


# ----------------------------------------------------------------------------- geometry
# How each layer kind maps its input and kernel to 2-D matrices and back.


def input_of(args: tuple, kwargs: dict) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def einsum_parts(mod: nn.Einsum, args: tuple, kwargs: dict, n_in: int):
    """``(input spec, kernel input letters, kernel output letters, output spec)``."""
    eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or mod.einsum_str
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->")
    xs, ks = lhs.split(",")
    return xs, ks[:n_in], ks[n_in:], out


# The layer kinds the geometry below knows: linen's, and NNX's once jlora.nnx_forward is
# imported (add_layer_kinds; linen users never import flax.nnx).
_DENSE: tuple[type, ...] = (nn.Dense,)  # contracts the last axis
_DENSE_GENERAL: tuple[type, ...] = (nn.DenseGeneral,)  # contracts ``axis``
_EINSUM: tuple[type, ...] = (nn.Einsum,)
_EMBED: tuple[type, ...] = (nn.Embed,)


def add_layer_kinds(*, dense: type, dense_general: type, einsum: type, embed: type) -> None:
    """Lets the geometry helpers serve another API's Dense, DenseGeneral, Einsum and Embed
    classes (NNX's Linear, LinearGeneral, Einsum, Embed): same attributes, same math."""
    global _DENSE, _DENSE_GENERAL, _EINSUM, _EMBED
    _DENSE, _DENSE_GENERAL, _EINSUM, _EMBED = (tuple(dict.fromkeys(k + (c,))) for k, c in (
        (_DENSE, dense), (_DENSE_GENERAL, dense_general), (_EINSUM, einsum), (_EMBED, embed)))


def dense_2d(mod: Any, x: jax.Array, n_in: int):
    """A Dense/DenseGeneral (Linear/LinearGeneral) input as (tokens, features): ``(x2d,
    leading shape)``."""
    axis = (-1,) if isinstance(mod, _DENSE) else (
        mod.axis if isinstance(mod.axis, tuple | list) else (mod.axis,))
    axis = tuple(ax % x.ndim for ax in axis)
    if axis != tuple(range(x.ndim - n_in, x.ndim)):  # contracted axes last, in order
        x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
    lead = x.shape[:x.ndim - n_in]
    return x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])), lead


def base_matmul(mod: Any, args: tuple, kwargs: dict, x, kernel, n_in: int):
    """The layer's own ``x @ W`` without its bias (Dense, DenseGeneral, Einsum)."""
    prec = getattr(mod, "precision", None)
    x, kernel = promote_dtype(x, kernel, dtype=mod.dtype)
    if isinstance(mod, _EINSUM):
        xs, kin, kout, out = einsum_parts(mod, args, kwargs, n_in)
        return jnp.einsum(f"{xs},{kin}{kout}->{out}", x, kernel, precision=prec)
    x2d, lead = dense_2d(mod, x, n_in)
    y = jnp.dot(x2d, kernel.reshape(x2d.shape[1], -1), precision=prec)
    return y.reshape(*lead, *kernel.shape[n_in:])


def low_rank(x2d, a2d, b2d, s, prec):
    """``((x2d @ A) * scale) @ B`` on the 2-D token layout: the scale lands on the rank-r
    intermediate and every matmul is a plain (tokens, features) one, so the backward pass
    needs no transposed copy of the layer's output gradient."""
    t = jnp.dot(x2d, a2d, precision=prec) * s.astype(x2d.dtype)
    return jnp.dot(t, b2d, precision=prec)


def embed_delta(mod: nn.Embed, method: str, args: tuple, a, b, s):
    if method == "attend":  # the tied head: q @ (A @ B).T = (q @ B.T) @ A.T
        q, a, b = promote_dtype(args[0], a, b, dtype=mod.dtype)
        q2d = q.reshape(-1, q.shape[-1])
        return low_rank(q2d, b.T, a.T, s, None).reshape(*q.shape[:-1], a.shape[0])
    (a, b) = promote_dtype(a, b, dtype=mod.dtype)
    t = jnp.take(a, args[0], axis=0) * s.astype(a.dtype)
    return jnp.dot(t, b, precision=None)


def delta(mod: Any, args: tuple, kwargs: dict, x, a, b, s, conv: Callable | None = None):
    """``scale * x @ A @ B`` in the layer's output layout, for its (dropped-out) input x.

    ``conv(x, a)`` runs the layer's own convolution with A as its kernel (Conv layers);
    linen's is built here, NNX's comes from :mod:`jlora.nnx_forward`."""
    prec = getattr(mod, "precision", None)
    x, a, b = promote_dtype(x, a, b, dtype=mod.dtype)
    n_in = a.ndim - 1
    r = a.shape[-1]
    if isinstance(mod, _DENSE + _DENSE_GENERAL):
        x2d, lead = dense_2d(mod, x, n_in)
        y = low_rank(x2d, a.reshape(-1, r), b.reshape(r, -1), s, prec)
        return y.reshape(*lead, *b.shape[1:])
    if isinstance(mod, _EINSUM):
        xs, kin, kout, out = einsum_parts(mod, args, kwargs, n_in)
        rl = free_letter(xs + kin + kout + out)
        ell = "..." if "..." in xs else ""
        t_spec = ell + "".join(c for c in xs.replace("...", "") if c in out) + rl
        t = jnp.einsum(f"{xs},{kin}{rl}->{t_spec}", x, a, precision=prec) * s.astype(x.dtype)
        return jnp.einsum(f"{t_spec},{rl}{kout}->{out}", t, b, precision=prec)
    if conv is None and isinstance(mod, nn.Conv):
        conv = lambda x, a: mod.clone(parent=None, name=None, features=r,  # noqa: E731
                                      use_bias=False).apply({"params": {"kernel": a}}, x)
    if conv is not None:
        t = conv(x, a) * s.astype(x.dtype)
        y = jnp.dot(t.reshape(-1, r), b.reshape(r, -1), precision=prec)
        return y.reshape(*t.shape[:-1], *b.shape[1:])
    raise TypeError(type(mod))  # pragma: no cover - _SUPPORTED is exhaustive


def per_feature(mod: Any, args: tuple, kwargs: dict, v: jax.Array, ndim: int,
                 n_in: int) -> jax.Array:
    """``v``, indexed by the kernel's output axes, shaped to broadcast over the layer's
    ``ndim``-axis output (Dense, DenseGeneral: the trailing axes; Einsum: where its output
    spec puts them)."""
    if not isinstance(mod, _EINSUM):
        return v
    _, _, kout, out = einsum_parts(mod, args, kwargs, n_in)
    pre, _, post = out.partition("...")
    sizes = dict(zip(kout, v.shape))
    order = [c for c in pre + post if c in sizes]
    v = jnp.transpose(v, [kout.index(c) for c in order])
    shape = [sizes[c] if c in sizes else 1 for c in pre]
    shape += [1] * (ndim - len(pre) - len(post)) + [sizes[c] if c in sizes else 1 for c in post]
    return v.reshape(shape)


# ----------------------------------------------------------------------------- adapter kinds


def dora(mod: Any, args: tuple, kwargs: dict, y, d, xd, kernel, a, b, s, m, bias):
    """PEFT's DoRA forward: ``m / n * (x @ W + scale * x @ A @ B) + bias``, with ``n`` the
    norm of ``W + scale * A @ B`` per output feature, detached from the gradient (the DoRA
    paper's section 4.3, as PEFT). The norm is the only place ``W + scale * A @ B`` is
    formed; activations take the layer's own ``x @ W`` and the low-rank ``d``. With dropout
    on the adapter input (``xd``, the dropped input; None without dropout), PEFT recomputes
    the base on the dropped input: ``y + (m / n - 1) * (dropout(x) @ W) + m / n * d``, and so
    does this. ``bias`` is the layer's bias, or None."""
    n_in = a.ndim - 1
    n = jax.lax.stop_gradient(weight_norm(kernel, a, b, s))
    lay = lambda v: per_feature(mod, args, kwargs, v.astype(y.dtype), y.ndim, n_in)  # noqa: E731
    f = lay(m / n)
    if xd is None:  # no dropout in this call: the layer's output serves
        bias = jnp.zeros((), y.dtype) if bias is None else lay(bias)
        return f * (y - bias + d) + bias
    return y + (f - 1) * base_matmul(mod, args, kwargs, xd, kernel, n_in).astype(y.dtype) + f * d


# ----------------------------------------------------------------------------- selection


def stack_adapters(leaves: list[jax.Array], axis: int) -> jax.Array:
    """Stacks adapters' A (rank last) or B (rank first) with their ranks zero-padded to the
    largest: a padded rank adds zeros, not error."""
    r = max(x.shape[axis] for x in leaves)
    pad = lambda x: jnp.pad(x, [(0, r - x.shape[axis]) if i == axis % x.ndim else (0, 0)  # noqa: E731
                                for i in range(x.ndim)])
    return jnp.stack([pad(x) for x in leaves])


def mixed_delta(mod: Any, path: str, method: str, x, routes, get):
    """The adapters' sum for a batch whose example ``i`` runs adapter ``route[i]`` (−1: none).

    Each example gathers its own A and B from the stacked adapters of this layer (ranks
    zero-padded to the largest) and runs ``(x_i @ A_i) * s_i @ B_i``: no ΔW, and per example
    only its adapter's low-rank FLOPs. ``routes`` is ``(ids, local)``: the batch's adapter
    indices and, for each index of the tree's adapter order, this layer's stack slot (−1
    where this layer has no such adapter); ``get(role, name)`` reads an adapter's leaf;
    ``path`` names the layer in errors."""
    ids, local = routes
    names = [n for n in local if n is not None]
    if not isinstance(mod, _DENSE + _DENSE_GENERAL + _EMBED):
        kind = next(c.__name__ for c in type(mod).__mro__ if c.__module__.startswith("flax"))
        raise LayoutError(f"{path}: a mixed-adapter batch runs "
                          f"Dense, DenseGeneral and Embed layers, not {kind}; "
                          "run this model's adapters one at a time (adapter='name').")
    batch = ids.shape[0]
    if x.ndim < 2 or x.shape[0] != batch:
        raise LayoutError(f"{path}: a mixed-adapter batch of "
                          f"{batch} examples, but this layer's input has shape {x.shape}; the "
                          "adapter indices need one entry per example (the first axis).")
    slot = jnp.asarray([-1 if n is None else names.index(n) for n in local] + [-1], jnp.int32)
    idx = slot[jnp.where(ids < 0, len(local), ids)]
    pick = jnp.maximum(idx, 0)
    a = stack_adapters([get(P.A_SUFFIX, n) for n in names], -1)
    b = stack_adapters([get(P.B_SUFFIX, n) for n in names], 0)
    s = jnp.stack([get(P.SCALE_SUFFIX, n).astype(jnp.float32) for n in names])
    s_ex = jnp.where(idx >= 0, s[pick], 0.0)
    if isinstance(mod, _EMBED) and method != "attend":  # x holds token ids
        a, b = promote_dtype(a, b, dtype=mod.dtype)
    else:
        x, a, b = promote_dtype(x, a, b, dtype=mod.dtype)
    s_ex = s_ex.astype(a.dtype)
    if isinstance(mod, _EMBED):
        if method == "attend":  # q @ (A @ B).T per example
            t = jnp.einsum("bsf,brf->bsr", x.reshape(batch, -1, x.shape[-1]), b[pick])
            y = jnp.einsum("bsr,bvr->bsv", t * s_ex[:, None, None], a[pick])
            return y.reshape(*x.shape[:-1], a.shape[1])
        t = a[pick.reshape((batch,) + (1,) * (x.ndim - 1)), x]  # (batch, ..., r)
        t = t.reshape(batch, -1, t.shape[-1]) * s_ex[:, None, None]
        return jnp.einsum("btr,bro->bto", t, b[pick]).reshape(*x.shape, b.shape[-1])
    n_in = a.ndim - 2
    x2d, lead = dense_2d(mod, x, n_in)
    if not lead or lead[0] != batch:
        raise LayoutError(f"{path}: a mixed-adapter batch of "
                          f"{batch} examples, but this layer's input has leading shape "
                          f"{tuple(lead)}; the adapter indices need one entry per example "
                          "(the first axis).")
    r = a.shape[-1]
    x3 = x2d.reshape(batch, -1, x2d.shape[-1])
    t = jnp.einsum("bti,bir->btr", x3, a[pick].reshape(batch, -1, r)) * s_ex[:, None, None]
    y = jnp.einsum("btr,bro->bto", t, b[pick].reshape(batch, r, -1))
    return y.reshape(*lead, *b.shape[2:])
