"""QLoRA's frozen base: NF4 (and FP4) leaves in bitsandbytes' layout.

``jlora.quantize(params)`` turns the chosen kernels into :class:`NF4` leaves (pytree nodes
that every jlora tree walker keeps whole, as frozen leaves); ``jlora.lora(model.apply)``
dequantizes each one inside its layer's matmul (:func:`dot`); ``jlora.dequantize`` returns
full arrays. ``jlora.hf.load`` reads transformers' bitsandbytes 4-bit checkpoints into them.
"""

from jlora.quant.matmul import dot, quantized_base
from jlora.quant.nf4 import NF4, dequantize_leaf, full, is_quantized, quantize_array
from jlora.quant.tree import dequantize, has_quantized, quantize, requantize_like, select

__all__ = ["NF4", "dequantize", "dequantize_leaf", "dot", "full", "has_quantized",
           "is_quantized", "quantize", "quantize_array", "quantized_base", "requantize_like",
           "select"]
