"""Rotary position embeddings: the inverse frequencies transformers computes for a config.

Used by :mod:`jlora.models.llama` (and importable from there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jlora import schema
from jlora.errors import HFError

ROPE_TYPES = ("default", "linear", "llama3")
_DEFAULT_THETA = 10000.0
_POSITIVE = schema.float32()
_OTHERS = (
    "use transformers for this model, or convert it to a default/linear/llama3 rope checkpoint"
)


def rope_parameters(
    hf: Mapping[str, Any], source: str = "config.json", max_position_embeddings: int | None = None
) -> dict[str, Any]:
    """The rotary parameters of a config.json, read as transformers 5 reads them, checked.

    ``rope_parameters`` (transformers >= 5) or the older ``rope_scaling`` (which transformers
    prefers when both are set; here they must then agree), with ``rope_theta`` and
    ``partial_rotary_factor`` from the dict or the top level. Returns ``{"rope_type",
    "rope_theta"}`` plus ``factor`` (linear, llama3) and ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings`` (llama3).

    Raises:
      HFError: naming ``source`` and the field: a value of the wrong type or range, a missing
        parameter, or a rope jlora does not implement (a type other than default, linear and
        llama3, partial rotation, per-layer-type parameters).

    Example:
      >>> rope_parameters({"rope_scaling": {"type": "linear", "factor": 2}, "rope_theta": 500})
      {'rope_type': 'linear', 'rope_theta': 500.0, 'factor': 2.0}
    """
    top = schema.read(
        hf,
        {
            "rope_parameters": schema.mapping(default=None, null=True),
            "rope_scaling": schema.mapping(default=None, null=True),
            "rope_theta": schema.float32(default=None, null=True),
            "partial_rotary_factor": schema.number(0, lo_open=True, default=None, null=True),
            "original_max_position_embeddings": schema.integer(default=None, null=True),
        },
        source=source,
        error=HFError,
    )
    params, scaling = top["rope_parameters"], top["rope_scaling"]
    if params and scaling and dict(params) != dict(scaling):
        raise HFError(
            f"{source} sets both rope_parameters and rope_scaling, with different "
            "values; keep one of them (transformers 5 writes rope_parameters)."
        )
    name = "rope_scaling" if scaling else "rope_parameters"
    rope = dict(scaling or params or {})
    nested = sorted(k for k, v in rope.items() if isinstance(v, Mapping))
    if nested:
        raise HFError(
            f"{source}: {name} has per-layer-type parameters ({', '.join(nested)}), "
            f"which jlora's llama model does not implement; {_OTHERS}."
        )
    kind = schema.read(
        rope,
        {
            "rope_type": schema.string(default=None, null=True),
            "type": schema.string(default="default", null=True),
        },
        source=source,
        error=HFError,
        prefix=f"{name}.",
    )
    rope_type = kind["rope_type"] or kind["type"]
    if rope_type not in ROPE_TYPES:
        field = "rope_type" if kind["rope_type"] else "type"
        raise schema.bad(
            HFError,
            source,
            f"{name}.{field}",
            rope_type,
            f"one of {', '.join(ROPE_TYPES)} (the rope types jlora implements)",
            _OTHERS,
        )
    fields = {
        "rope_theta": schema.float32(default=top["rope_theta"] or _DEFAULT_THETA),
        "partial_rotary_factor": schema.Field(
            "1 (jlora's llama model rotates the whole head)",
            lambda v: schema.is_number(v) and v == 1,
            default=top["partial_rotary_factor"] or 1.0,
            fix=_OTHERS,
        ),
    }
    if rope_type in ("linear", "llama3"):
        fields["factor"] = schema.float32(1.0, lo_open=False)  # transformers: factor >= 1
    if rope_type == "llama3":
        fields["low_freq_factor"] = _POSITIVE
        fields["high_freq_factor"] = _POSITIVE
        old = top["original_max_position_embeddings"] or max_position_embeddings
        fields["original_max_position_embeddings"] = schema.integer(
            default=schema.REQUIRED if old is None else old
        )
    values = schema.read(rope, fields, source=source, error=HFError, prefix=f"{name}.")
    if values["partial_rotary_factor"] != 1:
        raise schema.bad(
            HFError,
            source,
            "partial_rotary_factor",
            values["partial_rotary_factor"],
            fields["partial_rotary_factor"].want,
            _OTHERS,
        )
    out = {"rope_type": rope_type, "rope_theta": float(values["rope_theta"])}
    if "factor" in values:
        out["factor"] = float(values["factor"])
    if rope_type == "llama3":
        lo, hi = values["low_freq_factor"], values["high_freq_factor"]
        if hi <= lo:
            raise schema.bad(
                HFError,
                source,
                f"{name}.high_freq_factor",
                hi,
                f"greater than low_freq_factor={lo}",
            )
        if top["original_max_position_embeddings"] is not None:  # transformers' priority
            values["original_max_position_embeddings"] = top["original_max_position_embeddings"]
        out.update(
            low_freq_factor=float(lo),
            high_freq_factor=float(hi),
            original_max_position_embeddings=values["original_max_position_embeddings"],
        )
    return out


def rope_inv_freq(
    hf: Mapping[str, Any],
    head_dim: int,
    source: str = "config.json",
    max_position_embeddings: int | None = None,
) -> np.ndarray:
    """Rotary inverse frequencies of a config.json, as transformers computes them (float32).

    Reads the parameters with :func:`rope_parameters` (``max_position_embeddings`` is the
    fallback of llama3's ``original_max_position_embeddings``; by default the config's);
    supports rope types ``default``, ``linear`` and ``llama3``.
    """
    if max_position_embeddings is None:
        max_position_embeddings = hf.get("max_position_embeddings")
    return inv_freq(rope_parameters(hf, source, max_position_embeddings), head_dim, source)


def inv_freq(rope: Mapping[str, Any], head_dim: int, source: str = "config.json") -> np.ndarray:
    """Rotary inverse frequencies (float32) of checked parameters (:func:`rope_parameters`).

    Raises:
      HFError: the parameters overflow float32 (a theta or factor so extreme that a frequency
        is infinite or NaN), naming ``source``.
    """
    try:
        with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
            freq = _inv_freq(rope, head_dim)
    except FloatingPointError as e:
        freq, error = None, e
    if freq is None or not np.isfinite(freq).all():
        why = f" ({error})" if freq is None else ""
        raise HFError(
            f"{source}: the rope parameters {dict(rope)} give non-finite float32 "
            f"frequencies{why}; use values transformers accepts (rope_theta around "
            "1e4-1e6, factor >= 1)."
        )
    return freq


def _inv_freq(rope: Mapping[str, Any], head_dim: int) -> np.ndarray:
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    freq = (np.float32(1.0) / (np.float32(rope["rope_theta"]) ** exps)).astype(np.float32)
    if rope["rope_type"] == "default":
        return freq
    if rope["rope_type"] == "linear":
        return (freq / np.float32(rope["factor"])).astype(np.float32)
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = np.float32(2 * math.pi) / freq
    scaled = np.where(wavelen > lo_wavelen, freq / np.float32(factor), freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


__all__ = ["ROPE_TYPES", "inv_freq", "rope_inv_freq", "rope_parameters"]
