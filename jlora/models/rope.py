"""Rotary position embeddings: the inverse frequencies transformers computes for a config.

Used by :mod:`jlora.models.llama` (and importable from there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jlora.errors import HFError


def rope_inv_freq(hf: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """Rotary inverse frequencies of a config.json, as transformers computes them (float32).

    Reads ``rope_parameters`` (transformers >= 5) or the older ``rope_scaling`` +
    ``rope_theta``; supports rope types ``default``, ``linear`` and ``llama3``.
    """
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError("partial_rotary_factor != 1 is not supported by jlora's llama model")
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > lo_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise HFError(
        f"rope type {rope_type!r} is not supported by jlora's llama model "
        "(supported: default, linear, llama3)"
    )


__all__ = ["rope_inv_freq"]
