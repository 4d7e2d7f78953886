"""PEFT's ``adapter_config.json``, field by field: what jlora reads, accepts, or refuses.

:data:`PEFT_FIELDS` classifies every field of peft 0.21's ``LoraConfig`` (and its
``PeftConfig`` base) as one of

* **read**: it changes the math and jlora reproduces it (``r``, ``lora_alpha``,
  ``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
  ``rank_pattern``, ``alpha_pattern``, ``lora_dropout``, ``use_rslora``,
  ``init_lora_weights``, ``use_dora``, ``bias``, ``modules_to_save``;
  ``ensure_weight_tying`` is read by :func:`jlora.hf.load_peft`);
* **metadata**: it does not change what the adapter computes (``base_model_name_or_path``,
  ``task_type``, ``inference_mode``, ``fan_in_fan_out``, the sub-configs of inits that only
  shape the starting point...): type-checked and accepted;
* **unsupported**: it changes the math and jlora does not implement it
  (``layer_replication``, Megatron layers, a bias on lora_B, aLoRA, QA-LoRA, other LoRA
  variants...): accepted only when off (null, false, ``"none"``, empty).

A key peft 0.21 does not have (a newer peft's) is accepted only when off too: jlora cannot
tell whether it changes the math, and a silently ignored feature gives wrong outputs.
:func:`jlora.LoraConfig.from_peft` reads a dict with :func:`read_peft`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from typing import Any

from jlora import schema
from jlora.errors import ConfigError

__all__ = ["PEFT_FIELDS", "INIT_VALUES", "read_peft"]

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")
# init_lora_weights: jlora's init for each PEFT value. The inits that only pick the starting
# point (B = 0 or A = 0, base untouched) read as "default": the trained weights are loaded.
INIT_VALUES: dict[Any, str] = {
    True: "default",
    False: "random",
    "gaussian": "gaussian",
    "eva": "default",
    "orthogonal": "default",
    "mica": "default",
    "pissa": "pissa",
    "olora": "olora",
}
# Inits that rewrite the base weights with data jlora cannot reproduce.
_BASE_REWRITING = {
    "loftq": "LoftQ quantizes the base weights",
    "corda": "CorDA rewrites the base weights from activation statistics",
    "lora_ga": "LoRA-GA rewrites the base weights from gradients",
}


def _strings(v: Any, allow_str: bool = True) -> bool:
    if isinstance(v, str):
        return allow_str and bool(v)
    items = v if isinstance(v, list | tuple | Set) else None
    return items is not None and all(isinstance(x, str) and x for x in items)


def _layers(v: Any) -> bool:
    items = v if isinstance(v, list | tuple) else [v]
    return all(schema.is_int(i) and i >= 0 for i in items)


def _pattern(value_ok) -> Any:
    return lambda v: (
        isinstance(v, Mapping)
        and all(isinstance(k, str) and k and value_ok(x) for k, x in v.items())
    )


def _init_ok(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    return isinstance(v, str) and (
        v in INIT_VALUES or v in _BASE_REWRITING or bool(_PISSA_NITER.match(v))
    )


_FIX = "jlora cannot load such adapters exactly; use peft for this one"
_STRINGS = "a module-name list, a regex string, or 'all-linear'"


def _unsupported(feature: str) -> schema.Field:
    return schema.unsupported(f"{feature}, which jlora does not implement", _FIX)


_NULL_STRING = schema.or_null(schema.string(default=None))
_NULL_OBJECT = schema.or_null(schema.mapping(default=None))

PEFT_FIELDS: dict[str, schema.Field] = {
    # read: they change the math and jlora reproduces them
    "r": schema.integer(default=8),
    "lora_alpha": schema.float32(default=8),
    "target_modules": schema.Field(
        _STRINGS, _strings, fix="give the adapted modules (PEFT resolves them on save)"
    ),
    "exclude_modules": schema.Field(_STRINGS, _strings, default=None, null=True),
    "layers_to_transform": schema.Field(
        "a layer index or a list of them (non-negative ints)", _layers, default=None, null=True
    ),
    "layers_pattern": schema.Field(
        "a string or a list of strings", _strings, default=None, null=True
    ),
    "rank_pattern": schema.Field(
        "an object {regex: positive int}",
        _pattern(lambda x: schema.is_int(x) and x > 0),
        default={},
        null=True,
    ),
    "alpha_pattern": schema.Field(
        "an object {regex: positive number}",
        _pattern(lambda x: schema.is_number(x) and 0 < x <= schema.F32_MAX),
        default={},
        null=True,
    ),
    "lora_dropout": schema.probability(default=0.0, null=True),
    "use_rslora": schema.boolean(default=False),
    "init_lora_weights": schema.Field(
        "true, false, or one of "
        + ", ".join(repr(k) for k in (*INIT_VALUES, *_BASE_REWRITING) if isinstance(k, str))
        + ", 'pissa_niter_N'",
        _init_ok,
        default=True,
    ),
    "ensure_weight_tying": schema.boolean(default=False),
    "use_dora": schema.boolean(default=False),
    "bias": schema.choice("none", "all", "lora_only", default="none", null=True),
    "modules_to_save": schema.Field(
        "a list of module names (each matched as a suffix of the module path)",
        lambda v: _strings(v, allow_str=False),
        default=None,
        null=True,
    ),
    # metadata: no effect on what the adapter computes
    "base_model_name_or_path": _NULL_STRING,
    "revision": _NULL_STRING,
    "task_type": _NULL_STRING,
    "peft_version": _NULL_STRING,
    "inference_mode": schema.boolean(default=False),
    "auto_mapping": _NULL_OBJECT,
    # (in,out) storage of GPT-2's Conv1D; jlora's models know their own layouts
    "fan_in_fan_out": schema.boolean(default=False),
    "megatron_core": _NULL_STRING,  # read only with megatron_config
    "qalora_group_size": schema.integer(default=16),  # read only with use_qalora
    "runtime_config": _NULL_OBJECT,  # runtime-only, peft does not save it
    # sub-configs of inits: they only shape the starting point, or the init is refused below
    "loftq_config": _NULL_OBJECT,
    "eva_config": _NULL_OBJECT,
    "corda_config": _NULL_OBJECT,
    "lora_ga_config": _NULL_OBJECT,
    # unsupported: they change the math; accepted only when off
    "layer_replication": _unsupported("layer replication (a model with repeated layers)"),
    "megatron_config": _unsupported("Megatron parallel layers"),
    "lora_bias": _unsupported("a bias on lora_B"),
    "target_parameters": _unsupported("adapters on bare parameters (MoE experts)"),
    "trainable_token_indices": _unsupported("trainable token embeddings"),
    "use_qalora": _unsupported("QA-LoRA (pooled inputs)"),
    "alora_invocation_tokens": _unsupported("activated LoRA (aLoRA)"),
    "velora_config": _unsupported("the VeLoRA variant"),
    "monteclora_config": _unsupported("the MonteCLoRA variant"),
    "use_bdlora": _unsupported("block-diagonal LoRA (BD-LoRA)"),
    "arrow_config": _unsupported("Arrow routing"),
    "kasa_config": _unsupported("the KaSA variant"),
}


def read_peft(d: Mapping[str, Any], source: str = "adapter_config.json") -> dict[str, Any]:
    """The :class:`jlora.LoraConfig` keyword arguments of a PEFT ``adapter_config.json`` dict.

    Raises:
      ConfigError: naming ``source``, the field and the fix: another ``peft_type``, a field of
        the wrong type or value, a feature jlora does not implement, or an unknown field that
        is set.

    Example:
      >>> read_peft({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})["rank"]
      4
      >>> read_peft({"r": 4, "target_modules": ["q"], "layer_replication": [[0, 2]]})
      Traceback (most recent call last):
      ...
      jlora.errors.ConfigError: adapter_config.json: layer_replication=[[0, 2]] (a list) must ...
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source} must hold a JSON object, got {type(d).__name__}.")
    peft_type = d.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # a PeftType enum
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ConfigError(
            f"{source} has peft_type={peft_type!r}: jlora reads LoRA adapters "
            "only (peft_type 'LORA')."
        )
    v = schema.read(d, PEFT_FIELDS, source=source, error=ConfigError)
    unknown = [k for k in d if k not in PEFT_FIELDS and k != "peft_type"]
    for k in unknown:
        if not schema.is_off(d[k]):
            raise ConfigError(
                f"{source}: {k}={d[k]!r:.60} is set, but jlora does not know the field (it is "
                "not in peft 0.21's LoraConfig; a newer peft's?), so it cannot tell whether it "
                "changes the math. If the adapter does not depend on it, remove it from the "
                "file; else use peft."
            )
    init = v["init_lora_weights"]
    if init in _BASE_REWRITING:
        raise schema.bad(
            ConfigError,
            source,
            "init_lora_weights",
            init,
            "an init that leaves the base weights as they are (or pissa/olora, "
            f"which jlora reproduces): {_BASE_REWRITING[init]}",
            _FIX,
        )
    targets, layers, pattern = v["target_modules"], v["layers_to_transform"], v["layers_pattern"]
    if isinstance(targets, Set):
        targets = sorted(targets)
    if not targets:
        raise schema.bad(
            ConfigError,
            source,
            "target_modules",
            targets,
            "non-empty: this adapter adapts no module",
        )
    if isinstance(targets, str) or layers is None:
        # PEFT ignored layers_to_transform for a regex target (and layers_pattern without
        # layers_to_transform); newer versions refuse them. Neither changes the math.
        layers = pattern = None
    return {
        "rank": v["r"],
        "alpha": v["lora_alpha"],
        "targets": targets,
        "exclude": v["exclude_modules"],
        "layers": layers,
        "layers_pattern": pattern,
        "rank_pattern": v["rank_pattern"],
        "alpha_pattern": v["alpha_pattern"],
        "dropout": v["lora_dropout"],
        "init": _init(init),
        "use_rslora": v["use_rslora"],
        "use_dora": v["use_dora"],
        "modules_to_save": sorted(saved) if isinstance(saved := v["modules_to_save"], Set)
        else saved,
        "bias": v["bias"],
    }


def _init(value: bool | str) -> str:
    return value if isinstance(value, str) and _PISSA_NITER.match(value) else INIT_VALUES[value]
