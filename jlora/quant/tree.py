"""quantize / dequantize over a params tree (PEFT target rules choose the kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jlora import paths as P
from jlora.errors import QuantizationError, TargetError
from jlora.quant.nf4 import NF4, dequantize_leaf, is_quantized, quantize_array


def _is_kernel_target(module: str, leaves: dict[str, Any], targets: Any, exclude: Any) -> bool:
    if "kernel" not in leaves:
        return False
    if targets == P.ALL_LINEAR:
        if module.rsplit(".", 1)[-1] in P.OUTPUT_HEAD_NAMES:
            return False
        if not P.target_matches(module, [module], exclude=exclude):  # excluded
            return False
        return len(getattr(P.unbox(leaves["kernel"]), "shape", ())) == 2
    return P.target_matches(module, targets, exclude=exclude)


def select(modules: dict[str, dict[str, Any]], targets: Any = P.ALL_LINEAR,
           exclude: str | Sequence[str] | None = None) -> list[str]:
    """The module paths whose ``kernel`` :func:`quantize` takes, from ``{module: leaves}``
    (leaves may be shape structs). ``'all-linear'``: every 2-D kernel but the output head."""
    if not (targets == P.ALL_LINEAR or isinstance(targets, str) or (
            isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets))):
        raise QuantizationError(f"targets={targets!r}: pass 'all-linear', a regex string or a "
                                "list of module names (PEFT's target rules).")
    found = sorted(m for m, ls in modules.items() if _is_kernel_target(m, ls, targets, exclude))
    if not found:
        near = P.nearest(targets if isinstance(targets, str) else targets[0],
                         [m for m in modules if m])
        raise TargetError(f"quantize: targets {targets!r} match no module with a 'kernel' "
                          f"(exclude={exclude!r}). Nearest module paths: {', '.join(near)}.")
    return found


def quantize(params: Any, targets: str | Sequence[str] = P.ALL_LINEAR, *,
             exclude: str | Sequence[str] | None = None, block_size: int = 64,
             double_quant: bool = True, quant_type: str = "nf4") -> Any:
    """Stores the chosen kernels as :class:`~jlora.quant.NF4` leaves (QLoRA's frozen base).

    Codes and scales are bitsandbytes' (``quantize_4bit(kernel.T, blocksize, quant_type,
    compress_statistics=double_quant)``) bit for bit, save that the CPU 8-bit quantizer of
    bitsandbytes sometimes takes the farther of two scale codes where this takes the nearer.
    Embeddings, norms, biases and every leaf not chosen stay as they are.

    Args:
      params: what ``model.init`` returns, or a bare params tree (adapters may be present).
      targets: PEFT target rules over module paths (a list of names or suffixes, a regex
        string); ``'all-linear'`` (default): every 2-D ``kernel`` but the output head.
      exclude: PEFT's ``exclude_modules`` rules.
      block_size: elements per scale (64, as QLoRA).
      double_quant: quantize the scales too (8-bit, blocks of 256), as QLoRA.
      quant_type: ``'nf4'`` (default) or ``'fp4'``.

    Returns:
      The same kind of tree, each chosen ``kernel`` an :class:`~jlora.quant.NF4` leaf.

    Raises:
      QuantizationError: a chosen kernel is already quantized, is not 2-D or not floating,
        or its size is not a multiple of ``block_size``; a bad ``block_size``/``quant_type``.
      TargetError: the targets match no kernel.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> p = {"q_proj": {"kernel": jnp.ones((64, 32))}, "lm_head": {"kernel": jnp.ones((32, 8))}}
      >>> q = jlora.quantize(p)
      >>> type(q["q_proj"]["kernel"]).__name__, type(q["lm_head"]["kernel"]).__name__
      ('NF4', 'ArrayImpl')
      >>> float(jnp.abs(jlora.dequantize(q)["q_proj"]["kernel"] - 1).max())
      0.0
    """
    tree = P.params_of(params)
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in P.leaves_with_paths(tree):
        module, name = P.split_path(path)
        modules.setdefault(module, {})[name] = leaf
    chosen = set(select(modules, targets, exclude))
    for m in sorted(chosen):  # every check before any work
        k = P.unbox(modules[m]["kernel"])
        where = f"{m}.kernel" if m else "kernel"
        if is_quantized(k):
            raise QuantizationError(f"{where} is already quantized ({k!r}): quantize each "
                                    "kernel once (exclude it, or jlora.dequantize first).")
        from jlora.quant.nf4 import check_quantizable

        check_quantizable(tuple(k.shape), k.dtype, block_size, where)
    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"quant_type={quant_type!r}: choose 'nf4' or 'fp4'.")

    def fn(module, leaves):
        if module not in chosen:
            return leaves
        out = dict(leaves)
        k = out["kernel"]
        q = quantize_array(P.unbox(k), block_size=block_size, double_quant=double_quant,
                           quant_type=quant_type, where=f"{module}.kernel")
        out["kernel"] = q
        return out

    return P.with_params(params, P.map_modules(tree, fn))


def dequantize(params: Any) -> Any:
    """Every :class:`~jlora.quant.NF4` leaf of a tree as its full array (other leaves as
    they are): a tree a plain ``model.apply`` runs.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> q = jlora.quantize({"q": {"kernel": jnp.full((64, 2), 0.5)}}, ["q"])
      >>> jlora.dequantize(q)["q"]["kernel"].shape
      (64, 2)
    """
    return jax.tree.map(lambda x: dequantize_leaf(x) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def has_quantized(tree: Any) -> bool:
    """Whether a tree holds any :class:`~jlora.quant.NF4` leaf."""
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def requantize_like(new: Any, old: Any) -> Any:
    """``new`` with each kernel that is an NF4 leaf in ``old`` but full in ``new`` (a merged
    one) quantized again with the same settings."""
    olds = {p: x for p, x in P.leaves_with_paths(P.params_of(old)) if is_quantized(x)}

    def fn(kp, x):
        q = olds.get(P.keypath_to_path(kp))
        if q is None or is_quantized(x):
            return x
        return quantize_array(P.unbox(x), block_size=q.block_size, double_quant=q.double_quant,
                              quant_type=q.quant_type).astype(q.dtype)

    return P.with_params(new, jax.tree_util.tree_map_with_path(
        fn, P.params_of(new), is_leaf=P.is_leaf))


__all__ = ["NF4", "dequantize", "has_quantized", "quantize", "requantize_like", "select"]
