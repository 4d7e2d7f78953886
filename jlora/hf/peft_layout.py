"""PEFT's LoRA adapter layout, shared by :func:`jlora.hf.save_peft` and :func:`jlora.hf.load_peft`.

A PEFT adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors``.
Tensor layouts (jlora -> PEFT; the module path is the same on both sides):

* a kernel (in, out): ``<module>.lora_A.weight`` = A.T (r, in) and ``<module>.lora_B.weight``
  = B.T (out, r). GPT-2's ``Conv1D`` layers (``fan_in_fan_out``) use the same shapes: PEFT's
  lora_A/lora_B are ``nn.Linear`` whatever the base layer.
* an embedding (vocab, features): ``<module>.lora_embedding_A`` = A.T (r, vocab) and
  ``<module>.lora_embedding_B`` = B.T (features, r).

Every key carries PEFT's ``base_model.model.`` prefix; tensors are float32 with metadata
``{"format": "pt"}``. This module is internal to :mod:`jlora.hf`.

Example:
  >>> tensor_keys("model.layers.0.self_attn.q_proj", "kernel")[0]
  'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jlora import paths as P

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT's tensor-name suffixes, per adapted param kind: (A, B).
KERNEL_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBED_KEYS = (".lora_embedding_A", ".lora_embedding_B")
# What PEFT's save_embedding_layers adds beside an adapted embedding: the base weight.
BASE_LAYER_KEY = ".base_layer.weight"
# Input embeddings that a causal LM ties to its output head when it has no ``lm_head``, and
# the ones PEFT can tie an adapter for (``ensure_weight_tying``; its EMBEDDING_LAYER_NAMES).
TIED_EMBEDDINGS = ("embed_tokens", "wte")
PEFT_TIEABLE = ("embed_tokens",)
TIED_HEAD = "lm_head"
MAX_LISTED = 8


def listed(names: Iterable[str]) -> str:
    """The first :data:`MAX_LISTED` names, sorted and quoted, for error messages."""
    names = sorted(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:MAX_LISTED]) + more


def tensor_keys(module: str, param: str) -> tuple[str, str]:
    """PEFT's (A, B) tensor names for the adapter of ``<module>.<param>``."""
    a, b = EMBED_KEYS if param == "embedding" else KERNEL_KEYS
    return f"{PREFIX}{module}{a}", f"{PREFIX}{module}{b}"


def suffix_in(module: str, suffixes: Iterable[str]) -> bool:
    """Whether the dotted ``module`` path is one of ``suffixes`` or ends with one."""
    return any(module == s or module.endswith(f".{s}") for s in suffixes)


def module_leaves(tree: Any) -> dict[str, dict[str, Any]]:
    """``{module path: {leaf name: leaf}}`` of a params tree."""
    out: dict[str, dict[str, Any]] = {}
    for p, leaf in P.leaves_with_paths(tree):
        module, name = P.split_path(p)
        out.setdefault(module, {})[name] = leaf
    return out
