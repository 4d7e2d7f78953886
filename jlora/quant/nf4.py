"""The NF4 leaf: a frozen kernel in 4-bit NormalFloat (or FP4), in bitsandbytes' layout.

bitsandbytes quantizes PyTorch's ``(out, in)`` weight flattened, ``block_size`` consecutive
elements a block: each block is scaled by ``1 / absmax`` and every value takes the nearest
entry of the 16-value code book (a value exactly on a midpoint takes the lower code); two
codes share a byte, the first in the high nibble. With double quantization the block absmax
values, less their mean (``offset``), are quantized to 8 bits in blocks of 256 with
bitsandbytes' signed dynamic map. A linen kernel is ``(in, out)``: the transpose of that
weight, so an :class:`NF4` leaf of a kernel stores the blocks of ``kernel.T`` and its codes
and scales are bitsandbytes' own, bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import QuantizationError
from jlora.quant.tables import DYNAMIC_MAP

# bitsandbytes.functional.get_4bit_type("nf4") and ("fp4"), float32.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
FP4_CODE = np.array([
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25], np.float32)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCK_SIZE = 256


def dynamic_map() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: the 256-value code of the scales."""
    return DYNAMIC_MAP


def _bounds(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 midpoints of the sorted code, the code index of each sorted position)."""
    order = np.argsort(code, kind="stable")
    s = code[order]
    return ((s[:-1] + s[1:]) / np.float32(2.0)).astype(np.float32), order.astype(np.uint8)


def _bucket(scaled: jax.Array, bounds: np.ndarray) -> jax.Array:
    """torch.bucketize(scaled, bounds): how many bounds lie strictly below each value (one
    comparison per bound, fused: no (n, len(bounds)) temporary)."""
    q = jnp.zeros(scaled.shape, jnp.int32)
    for b in bounds.tolist():
        q = q + (scaled > jnp.float32(b)).astype(jnp.int32)
    return q


def _absmax_scale(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # bitsandbytes divides by max(absmax, 1e-38); XLA flushes that denormal to zero, so an
    # all-zero block is scaled by zero here (both give it the code of 0.0)
    inv = jnp.where(absmax > 0, jnp.float32(1.0) / absmax, jnp.float32(0.0))
    return absmax, jnp.clip(blocks * inv[:, None], -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("block_size", "quant_type"))
def _quantize_flat(w: jax.Array, *, block_size: int, quant_type: str):
    absmax, scaled = _absmax_scale(w.astype(jnp.float32).reshape(-1, block_size))
    bounds, order = _bounds(CODES[quant_type])
    q = jnp.asarray(order)[_bucket(scaled, bounds)].reshape(-1)
    return (q[0::2] << 4) | q[1::2], absmax, jnp.mean(absmax)


@jax.jit
def _quantize_scales(absmax: jax.Array, offset: jax.Array):
    """Double quantization. ``offset`` comes in computed (a separate jit): inside one
    computation XLA may fuse the mean into ``absmax - offset`` with another rounding."""
    rest = absmax - offset
    pad = -rest.size % NESTED_BLOCK_SIZE
    nested, scaled = _absmax_scale(jnp.pad(rest, (0, pad)).reshape(-1, NESTED_BLOCK_SIZE))
    q8 = _bucket(scaled, _bounds(dynamic_map())[0]).reshape(-1)[:rest.size]
    return q8.astype(jnp.uint8), nested


class NF4:
    """A frozen kernel stored in 4 bits (bitsandbytes' NF4 or FP4 layout): a pytree node.

    Functions that walk a params tree keep it whole, as a frozen leaf; only the adapted layer
    (inside :func:`jlora.lora`) and :func:`jlora.dequantize` open it. ``shape`` and ``dtype``
    are the kernel's (linen's ``(in, out)``); the blocks are those of PyTorch's ``(out, in)``
    weight, so ``codes`` and ``absmax`` equal what bitsandbytes writes.

    Attributes:
      codes: uint8 ``(size // 2,)``, two 4-bit codes a byte, the first in the high nibble.
      absmax: the block scales: float32 ``(size // block_size,)``, or uint8 codes of
        ``dynamic_map()`` with double quantization.
      nested_absmax: float32 ``(ceil(blocks / 256),)`` (double quantization), else None.
      offset: float32 ``()``, the mean the scales were centred by (double quantization).
      shape, dtype: the kernel's (static); ``dequantize`` returns this dtype.
      block_size: elements per block (64 by default, as bitsandbytes).
      quant_type: ``'nf4'`` or ``'fp4'``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> q = jlora.quantize({"q_proj": {"kernel": jnp.ones((64, 8))}})["q_proj"]["kernel"]
      >>> q.shape, q.codes.shape, q.absmax.dtype
      ((64, 8), (256,), dtype('uint8'))
    """

    jlora_quantized = True  # the mark jlora.paths.is_leaf looks for

    def __init__(self, codes: Any, absmax: Any, nested_absmax: Any = None, offset: Any = None,
                 *, shape: tuple[int, ...], dtype: Any = jnp.float32, block_size: int = 64,
                 quant_type: str = "nf4"):
        self.codes, self.absmax = codes, absmax
        self.nested_absmax, self.offset = nested_absmax, offset
        self.shape = tuple(int(d) for d in shape)
        self.dtype = jnp.dtype(dtype)
        self.block_size = int(block_size)
        self.quant_type = quant_type

    # array-like metadata, so shape-only code (plan, summary, specs) reads it as a kernel
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and scales), against ``size * dtype.itemsize`` unquantized."""
        return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in self._children()
                   if x is not None)

    def astype(self, dtype: Any) -> NF4:
        """The same codes, dequantizing to ``dtype`` (a precision policy's frozen dtype)."""
        return self._with(self._children(), dtype=dtype)

    def _children(self) -> tuple[Any, ...]:
        return (self.codes, self.absmax, self.nested_absmax, self.offset)

    def _aux(self) -> tuple[Any, ...]:
        return (self.shape, self.dtype.name, self.block_size, self.quant_type)

    def _with(self, children, **aux) -> NF4:
        shape, dtype, block_size, quant_type = self._aux()
        kw = dict(shape=shape, dtype=dtype, block_size=block_size, quant_type=quant_type) | aux
        return NF4(*children, **kw)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4(shape={self.shape}, dtype={self.dtype.name}, quant_type={self.quant_type}"
                f", block_size={self.block_size}{dq})")


_NAMES = ("codes", "absmax", "nested_absmax", "offset")


def _flatten_with_keys(q: NF4):
    return tuple((jax.tree_util.GetAttrKey(n), c) for n, c in zip(_NAMES, q._children())), q._aux()


def _unflatten(aux, children) -> NF4:
    shape, dtype, block_size, quant_type = aux
    return NF4(*children, shape=shape, dtype=dtype, block_size=block_size,
               quant_type=quant_type)


jax.tree_util.register_pytree_with_keys(
    NF4, _flatten_with_keys, _unflatten, lambda q: (q._children(), q._aux()))


def is_quantized(x: Any) -> bool:
    """True for an :class:`NF4` leaf (any quantized param jlora stores)."""
    return isinstance(x, NF4)


def check_quantizable(shape: tuple[int, ...], dtype: Any, block_size: int, where: str) -> None:
    """Raises :class:`QuantizationError` for a kernel ``quantize_array`` cannot take."""
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(f"block_size={block_size!r}: bitsandbytes uses one of "
                                f"{BLOCK_SIZES}; pick one (64 is QLoRA's).")
    if len(shape) != 2:
        raise QuantizationError(f"{where} has shape {shape}: jlora quantizes 2-D kernels "
                                "(Dense) only; exclude it from the targets.")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise QuantizationError(f"{where} has dtype {jnp.dtype(dtype)}: only floating "
                                "kernels can be quantized; exclude it from the targets.")
    if math.prod(shape) % block_size:
        raise QuantizationError(
            f"{where} has {math.prod(shape)} elements ({shape}), not a multiple of "
            f"block_size={block_size}; pick a block size that divides it or exclude it from "
            "the targets.")


def quantize_array(kernel: Any, *, block_size: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4", where: str = "the kernel") -> NF4:
    """One ``(in, out)`` kernel as an :class:`NF4` leaf (the blocks of ``kernel.T``)."""
    if is_quantized(kernel):
        raise QuantizationError(f"{where} is already quantized ({kernel!r}); quantize the "
                                "full-precision params, or jlora.dequantize them first.")
    if quant_type not in CODES:
        raise QuantizationError(f"quant_type={quant_type!r}: choose 'nf4' or 'fp4'.")
    shape, dtype = tuple(np.shape(kernel)), jnp.result_type(kernel)
    check_quantizable(shape, dtype, block_size, where)
    flat = jnp.asarray(kernel).T.reshape(-1)
    codes, absmax, offset = _quantize_flat(flat, block_size=block_size, quant_type=quant_type)
    nested = None
    if double_quant:
        absmax, nested = _quantize_scales(absmax, offset)
    else:
        offset = None
    return NF4(codes, absmax, nested, offset, shape=shape, dtype=dtype, block_size=block_size,
               quant_type=quant_type)


def block_scales(q: NF4) -> jax.Array:
    """The float32 absmax of every block (double quantization undone as bitsandbytes does:
    ``code[q] * nested_absmax + offset``)."""
    if not q.double_quant:
        return jnp.asarray(q.absmax, jnp.float32)
    n = q.absmax.shape[0]
    nested = jnp.repeat(q.nested_absmax, NESTED_BLOCK_SIZE)[:n]
    return jnp.asarray(dynamic_map())[q.absmax.astype(jnp.int32)] * nested + q.offset


def dequantize_transposed(q: NF4, dtype: Any = None, after: jax.Array | None = None
                          ) -> jax.Array:
    """The weight in bitsandbytes' ``(out, in)`` layout (the kernel's transpose).

    ``after``: an array the result is made to depend on (its first element times zero is
    added to the packed codes and the scales), so that XLA computes the weight only once
    ``after`` exists and cannot merge any part of this copy with another (see
    :mod:`jlora.quant.matmul`).
    """
    scales, codes = block_scales(q), q.codes
    table = jnp.asarray(CODES[q.quant_type])
    if after is not None:
        tie = after.reshape(-1)[0].astype(jnp.float32) * jnp.float32(0.0)
        scales, codes = scales + tie, codes + tie.astype(codes.dtype)
    codes = codes.astype(jnp.int32)
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1, q.block_size)
    w = table[idx] * scales[:, None]
    return w.reshape(q.shape[::-1]).astype(dtype or q.dtype)


def dequantize_leaf(q: NF4, dtype: Any = None) -> jax.Array:
    """The full ``(in, out)`` kernel of an :class:`NF4` leaf."""
    return dequantize_transposed(q, dtype).T


def full(x: Any) -> Any:
    """``x`` dequantized if it is an :class:`NF4` leaf, else ``x`` itself."""
    return dequantize_leaf(x) if is_quantized(x) else x
