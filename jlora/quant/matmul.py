"""The base's storage in the adapted layer: ``x @ W`` for an NF4 kernel, dequantized on the fly.

:func:`dot` is a ``jax.custom_vjp`` whose only residual is the NF4 leaf itself: the backward
pass dequantizes the kernel again, and each dequantization is made to depend on the
matmul's other operand (the input forward, the incoming gradient backward: ``0 * t[0]``
added to the block scales). Without that dependency XLA computes every layer's weight at
the start of the step and shares it between forward and backward (optimization barriers
do not survive its CPU pipeline's CSE), so all of them live through the step; with it no
full-precision copy of a quantized kernel lives longer than its own matmul. Gradients
never reach the NF4 leaf: asking for them (differentiating w.r.t. its scales, or with
``allow_int``) is a :class:`~jlora.errors.QuantizationError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import paths as P
from jlora.errors import QuantizationError
from jlora.quant.nf4 import NF4, dequantize_transposed, is_quantized

_GRAD_ERROR = (
    "gradients were requested for a quantized (NF4) kernel{where}: NF4 leaves are frozen. "
    "Differentiate only the adapters (trainable, frozen = jlora.split(params); "
    "jax.grad(loss)(trainable, ...) with jlora.combine(trainable, frozen) inside), as "
    "jlora.train does."
)


def _perturbed(tree: Any) -> bool:
    return any(getattr(p, "perturbed", False) for p in jax.tree.leaves(tree))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(x: jax.Array, q: NF4, precision: Any) -> jax.Array:
    w = dequantize_transposed(q, x.dtype, after=x)  # (out, in), once x exists
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)


def _dot_fwd(x, q, precision):
    if _perturbed(q):
        raise QuantizationError(_GRAD_ERROR.format(where=f" of shape {q.shape}"))
    xv = x.value
    qv = jax.tree.map(lambda p: p.value, q, is_leaf=lambda p: hasattr(p, "perturbed"))
    return _dot(xv, qv, precision), (qv, jnp.zeros((0,), xv.dtype))


def _dot_bwd(precision, res, g):
    q, like = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    w = dequantize_transposed(q, like.dtype, after=g)  # a fresh copy, once g arrives
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (0,)), ((), ())), precision=precision)
    return dx.astype(like.dtype), None


_dot.defvjp(_dot_fwd, _dot_bwd, symbolic_zeros=True)


def dot(x: jax.Array, q: NF4, precision: Any = None) -> jax.Array:
    """``x @ W`` over x's last axis for an NF4 ``(in, out)`` kernel, in ``x``'s dtype.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> from jlora.quant import dot
      >>> q = jlora.quantize({"k": {"kernel": jnp.ones((64, 4))}}, ["k"])["k"]["kernel"]
      >>> dot(jnp.ones((2, 64)), q).tolist()[0]
      [64.0, 64.0, 64.0, 64.0]
    """
    if x.shape[-1] != q.shape[0]:
        raise QuantizationError(f"input has {x.shape[-1]} features but the NF4 kernel is "
                                f"{q.shape} (in, out).")
    return _dot(x, q, precision)


def quantized_base(mod: nn.Module, method: str, args: tuple, kwargs: dict
                   ) -> Callable[[], jax.Array] | None:
    """The layer's own output when its kernel is an NF4 leaf (as a thunk), else None.

    Called from :func:`jlora.lora`'s interceptor for every supported layer, adapted or not:
    linen's Dense would read the NF4 leaf as an array. Computes what ``nn.Dense`` (and a
    ``nn.DenseGeneral`` over the last axis) computes, ``x @ W + bias`` with the layer's
    dtype promotion and precision, through :func:`dot`.
    """
    if method != "__call__" or mod.scope is None or not mod.has_variable("params", "kernel"):
        return None
    kernel = P.unbox(mod.get_variable("params", "kernel"))
    if not is_quantized(kernel):
        return None
    path = ".".join(str(p) for p in mod.scope.path)
    dense_general = isinstance(mod, nn.DenseGeneral) and mod.axis in (-1, (-1,)) and (
        not mod.batch_dims)
    if not (isinstance(mod, nn.Dense) or dense_general):
        raise QuantizationError(f"{path}: an NF4 kernel runs in nn.Dense (or a DenseGeneral "
                                f"over the last axis), not {type(mod).__name__}; exclude it "
                                "from jlora.quantize's targets.")

    def run() -> jax.Array:
        x = args[0] if args else kwargs["inputs"]
        bias = P.unbox(mod.get_variable("params", "bias")) if mod.has_variable(
            "params", "bias") else None
        dtype = mod.dtype or jnp.result_type(x.dtype, kernel.dtype,
                                             *(() if bias is None else (bias.dtype,)))
        y = dot(jnp.asarray(x, dtype), kernel, getattr(mod, "precision", None))
        y = y.reshape(*y.shape[:-1], *kernel.shape[1:])
        return y if bias is None else y + jnp.asarray(bias, dtype)

    return run


__all__ = ["dot", "quantized_base"]
