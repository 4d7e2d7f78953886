"""Flax linen models with transformers parity: Llama/Mistral/Qwen2, GPT-2, BERT.

Param paths equal transformers' module names (``model.layers.0.self_attn.q_proj``), so PEFT
``target_modules`` carry over unchanged.
"""

from __future__ import annotations

import importlib

from jlora.errors import HFError
from jlora.models.base import ArchSpec

# model_type -> module that defines SPEC
_ARCH_MODULES = {
    "llama": "jlora.models.llama",
    "mistral": "jlora.models.llama",
    "qwen2": "jlora.models.llama",
    "gpt2": "jlora.models.gpt2",
    "bert": "jlora.models.bert",
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCH_MODULES))


def arch_spec(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` for a config.json ``model_type``; a clear error for others."""
    if model_type not in _ARCH_MODULES:
        raise HFError(
            f"unsupported model_type {model_type!r}: jlora has Flax models for "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the checkpoint to one of these, or "
            "use jlora's core (inject/lora/merge) on your own linen model."
        )
    return importlib.import_module(_ARCH_MODULES[model_type]).SPEC


__all__ = ["ArchSpec", "arch_spec", "SUPPORTED_MODEL_TYPES"]
