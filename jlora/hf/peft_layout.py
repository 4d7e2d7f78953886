"""PEFT's LoRA adapter layout, shared by :func:`jlora.hf.save_peft` and :func:`jlora.hf.load_peft`.

A PEFT adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors``.
Tensor layouts (jlora -> PEFT; the module path is the same on both sides):

* a kernel (in, out): ``<module>.lora_A.weight`` = A.T (r, in) and ``<module>.lora_B.weight``
  = B.T (out, r). GPT-2's ``Conv1D`` layers (``fan_in_fan_out``) use the same shapes: PEFT's
  lora_A/lora_B are ``nn.Linear`` whatever the base layer.
* an embedding (vocab, features): ``<module>.lora_embedding_A`` = A.T (r, vocab) and
  ``<module>.lora_embedding_B`` = B.T (features, r).
* DoRA's magnitude (out,): ``<module>.lora_magnitude_vector``.
* a trainable copy (``modules_to_save``, biases of the ``bias`` modes): the param under its
  transformers name (``<module>.weight`` in torch's layout, ``<module>.bias``), as PEFT saves
  them (it drops ``modules_to_save.default.``); the bias of a LoRA-adapted module is
  ``<module>.base_layer.bias``.

Every key carries PEFT's ``base_model.model.`` prefix; tensors are float32 with metadata
``{"format": "pt"}``. This module is internal to :mod:`jlora.hf`.

Example:
  >>> tensor_keys("model.layers.0.self_attn.q_proj", "kernel")[0]
  'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jlora import paths as P
from jlora.errors import ConfigError, HFError, ShapeError
from jlora.hf.io import read_tensor
from jlora.models import SUPPORTED_MODEL_TYPES, arch_spec
from jlora.models.base import ArchSpec
from jlora.models.common import linear_params_to_hf

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT's tensor-name suffixes, per adapted param kind: (A, B).
KERNEL_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBED_KEYS = (".lora_embedding_A", ".lora_embedding_B")
# What PEFT's save_embedding_layers adds beside an adapted embedding: the base weight.
BASE_LAYER_KEY = ".base_layer.weight"
MAGNITUDE_KEY = ".lora_magnitude_vector"  # DoRA
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


def copy_key(module: str, param: str, shape: tuple[int, ...], spec: ArchSpec | None,
             adapted: bool) -> tuple[str, bool]:
    """PEFT's tensor name of the trainable copy of ``<module>.<param>``, and whether it is
    stored transposed: the transformers name and layout (``spec.params_to_hf``), with
    ``base_layer.`` before the last name in a LoRA-adapted module (whose bias PEFT saves as
    ``<module>.base_layer.bias``).

    Without a spec (the model type unknown) only params whose layout every architecture
    shares are named (``nn.Linear``'s biases, norm scales, embeddings): a kernel is stored
    transposed by ``nn.Linear`` and as it is by GPT-2's ``Conv1D``, and jlora never guesses.

    Raises:
      HFError: a kernel without a spec, or a param with no transformers tensor of its own.

    Example:
      >>> copy_key("score", "bias", (3,), None, adapted=False)
      ('base_model.model.score.bias', False)
      >>> copy_key("q", "bias", (3,), None, adapted=True)
      ('base_model.model.q.base_layer.bias', False)
    """
    path = (*module.split("."), param) if module else (param,)
    where = ".".join(path)
    if spec is None and param == "kernel":
        raise HFError(
            f"{where} has a trainable copy (modules_to_save), which PEFT stores in the model's "
            "transformers layout: transposed for nn.Linear, as it is for GPT-2's Conv1D, and "
            "this model's type is unknown. Pass hf_config=jlora.hf.load(base)[2].")
    to_hf = spec.params_to_hf if spec is not None else functools.partial(
        linear_params_to_hf, "this model")
    probe = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    try:
        out = to_hf(path, probe)
    except HFError:
        out = []
    if len(out) != 1:
        raise HFError(f"{where} has no transformers tensor of its own, so PEFT has no name for "
                      "a trainable copy of it; leave its module out of modules_to_save.")
    name, hf = out[0]
    transposed = hf.shape != probe.shape or not np.array_equal(hf, probe)
    if adapted:
        head, _, last = name.rpartition(".")
        name = f"{head}.base_layer.{last}" if head else f"base_layer.{last}"
    return PREFIX + name, transposed


class PeftExportWarning(UserWarning):
    """:func:`jlora.hf.save_peft` could not tell the base model's type, so the exported
    ``adapter_config.json`` may lack what peft needs to load it silently (``task_type``,
    ``fan_in_fan_out`` for GPT-2's Conv1D layers)."""


def model_config(hf_config: Mapping[str, Any] | None, model_type: str | None,
                 base: str | None) -> tuple[Mapping[str, Any] | None, ArchSpec | None, str]:
    """``(hf_config, spec, why)``: the base model's config.json dict and architecture.

    From ``hf_config`` or ``model_type`` when given; else from ``base``'s config.json when
    ``base`` is a local directory holding one. ``why`` says what kept them unknown ('' when
    known).
    """
    from jlora.hf.load import read_config

    if hf_config is None and model_type is None and base is not None:
        if not (Path(base) / "config.json").is_file():
            return None, None, f"{base!r} is not a local directory with a config.json"
        try:
            hf_config = read_config(base)
        except HFError as e:
            return None, None, f"{base!r}'s config.json does not read ({e})"
        if hf_config["model_type"] not in SUPPORTED_MODEL_TYPES:
            return hf_config, None, (f"{base!r} is a {hf_config['model_type']!r} model, which "
                                     "jlora has no layout for")
    if model_type is None and hf_config is not None:
        model_type = hf_config.get("model_type")
    if model_type is None:
        return hf_config, None, "neither hf_config nor model_type was given"
    return hf_config, arch_spec(model_type), ""


def warn_unknown_model(why: str, what: str) -> None:
    """Warns (:class:`PeftExportWarning`) that the base model's type is unknown."""
    warnings.warn(
        f"save_peft: the base model's type is unknown ({why}), so {what}; peft may warn or "
        "misread the adapter. Pass hf_config=jlora.hf.load(base)[2] (or model_type=...).",
        PeftExportWarning, stacklevel=3)


def check_tied_head(path, head, head_patterns, entries, config) -> str | None:
    """Checks PEFT's tied lm_head adapter against the embedding's; returns that module."""
    emb = [e for e in entries.values() if e.param == "embedding"
           and suffix_in(e.module, PEFT_TIEABLE)]
    if not emb:
        if head:
            raise HFError(f"the adapter in {str(path)!r} holds {TIED_HEAD} tensors tied to an "
                          "input embedding it does not adapt.")
        return None
    e = emb[0]
    rank = head_patterns.get("rank_pattern") or config.rank
    alpha = head_patterns.get("alpha_pattern") or config.alpha
    if (rank, float(alpha)) != (e.rank, e.alpha):
        raise ConfigError(f"the adapter ties {TIED_HEAD} to {e.module} with rank/alpha "
                          f"{rank}/{alpha} against {e.rank}/{e.alpha:g}: jlora's tied head "
                          "uses the embedding's adapter and scale; re-export with equal ones.")
    want = {KERNEL_KEYS[0]: (e.rank, e.shape[1]), KERNEL_KEYS[1]: (e.shape[0], e.rank)}
    base = head.get(BASE_LAYER_KEY)
    if set(head) - {BASE_LAYER_KEY} != set(want) or any(
            head[k].shape != v for k, v in want.items()) or (
            base is not None and base.shape != (e.shape[0], e.shape[1])):
        got = {i.name: i.shape for i in head.values()}
        raise ShapeError(f"the adapter in {str(path)!r} ties {TIED_HEAD} to {e.module} but "
                         f"holds {got}; expected lora_A {want[KERNEL_KEYS[0]]} and lora_B "
                         f"{want[KERNEL_KEYS[1]]}.")
    return e.module


def check_tied_values(head: dict[str, Any], e: Any, emb: dict[str, Any]) -> None:
    """The head's tensors must be the embedding's, transposed."""
    for key, mine in ((KERNEL_KEYS[0], e.param + P.B_SUFFIX),
                      (KERNEL_KEYS[1], e.param + P.A_SUFFIX)):
        theirs = read_tensor(head[key])  # lora_A = B (r, features), lora_B = A
        if not np.allclose(theirs, np.asarray(P.unbox(emb[mine]), np.float32),
                           rtol=1e-3, atol=1e-6):
            raise HFError(f"{head[key].name!r} is not the tied transpose of "
                          f"{e.module}'s adapter, though ensure_weight_tying is set; jlora "
                          "adapts a tied head with the embedding's own adapter.")
