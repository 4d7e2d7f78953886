"""PEFT adapter export and import: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are the ones ``peft.PeftModel.save_pretrained`` writes for a LoRA adapter, so that
``peft.PeftModel.from_pretrained(transformers_model, path)`` runs the adapter trained in jlora
with the same outputs, and an adapter trained in PyTorch loads into jlora. This module holds
:func:`save_peft`; :func:`load_peft` lives in :mod:`jlora.hf.peft_load` and the tensor layout
shared by both in :mod:`jlora.hf.peft_layout`; both functions are importable from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jlora import adapters as adapters_mod
from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import ConfigError, HFError, TargetError
from jlora.hf.io import write_safetensors
from jlora.hf.output import PEFT_ADAPTER, check_target, write_output
from jlora.hf.peft_layout import (
    CONFIG_FILE,
    KERNEL_KEYS,
    MAGNITUDE_KEY,
    PEFT_TIEABLE,
    PREFIX,
    TIED_EMBEDDINGS,
    TIED_HEAD,
    WEIGHTS_FILE,
    PeftExportWarning,
    copy_key,
    listed,
    model_config,
    suffix_in,
    tensor_keys,
    warn_unknown_model,
)
from jlora.hf.peft_load import load_peft
from jlora.inject import plan
from jlora.merge import copy_params

# task_type per transformers Auto class of jlora's models.
_TASK_TYPES = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModel": "FEATURE_EXTRACTION"}


@dataclasses.dataclass(frozen=True)
class _Adapter:
    module: str
    param: str  # "kernel" or "embedding"
    a: Any
    b: Any
    scale: Any
    magnitude: Any  # DoRA's, or None


@dataclasses.dataclass(frozen=True)
class _Copy:
    module: str
    param: str
    value: Any  # the trained copy (the param itself once merged)


def _adapters(tree: Any) -> tuple[list[_Adapter], list[_Copy]]:
    """The tree's LoRA/DoRA adapters and trainable copies, by module path."""
    adapters: list[_Adapter] = []
    copies: list[_Copy] = []

    def fn(module, leaves):
        get = lambda name: P.unbox(leaves[name]) if name in leaves else None  # noqa: E731
        for param in P.adapter_params(leaves):
            scale = leaves.get(param + P.SCALE_SUFFIX, leaves.get(param + P.MERGED_SUFFIX))
            adapters.append(_Adapter(module, param, get(param + P.A_SUFFIX),
                                     get(param + P.B_SUFFIX), P.unbox(scale),
                                     get(param + P.MAGNITUDE_SUFFIX)))
        for param in copy_params(leaves):
            saved = get(param + P.SAVED_SUFFIX)
            copies.append(_Copy(module, param, get(param) if saved is None else saved))
        return leaves

    P.map_modules(tree, fn)
    return (sorted(adapters, key=lambda x: x.module),
            sorted(copies, key=lambda x: (x.module, x.param)))


def _strip_adapters(tree: Any) -> Any:
    return P.map_modules(tree, lambda _, ls: {k: v for k, v in ls.items()
                                               if not P.is_adapter_name(k)})


def save_peft(
    params: Any,
    config: LoraConfig,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    model_type: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    name: str = P.DEFAULT_ADAPTER,
) -> Path:
    """Writes the adapters of ``params`` as a PEFT LoRA adapter directory.

    ``path`` receives ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
    ``peft.PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained`` on the
    transformers model gives jlora's outputs. The config written holds every field that
    changes the math (``r``, ``lora_alpha``, ``target_modules`` with ``"all-linear"`` resolved
    to the adapted module paths, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
    ``use_dora``, ``bias``, ``modules_to_save``, ``fan_in_fan_out`` for GPT-2 ``Conv1D``
    targets, ``lora_dropout``, ``layers_to_transform``, ``exclude_modules``,
    ``init_lora_weights``). DoRA's magnitudes are written as ``lora_magnitude_vector``, the
    trainable copies (``modules_to_save``, biases) under their transformers names, as PEFT
    saves them.

    Every check runs before anything is written, and the write is crash-safe: an interrupted
    export leaves the previous adapter at ``path`` (or nothing that loads), and the next
    save or :func:`load_peft` completes or clears it (see :mod:`jlora.hf.output`). A save
    refuses the current directory or a parent of it, the base model's directory, and a
    directory that holds other files without being an adapter directory (unless
    ``overwrite=True``); it replaces only ``adapter_config.json`` and
    ``adapter_model.safetensors``, never other files. A merged tree (after ``jlora.merge(p)``)
    exports the same adapter as its unmerged form: ``merge`` keeps A, B and the scale, and
    only those are written (never the merged kernels).

    An adapted input embedding that the model ties to its output head (a Llama-family model
    without ``lm_head``) also adapts the head in jlora; the export sets PEFT's
    ``ensure_weight_tying`` and writes the head's tied ``lora_A``/``lora_B`` so that PEFT does
    the same. Base weights are never written (PEFT's ``save_embedding_layers`` would copy the
    unchanged base embedding; the math is the same without it).

    Args:
      params: an adapted tree (``{'params': ...}`` or bare), from ``jlora.inject`` or
        :func:`load_peft`.
      config: the :class:`jlora.LoraConfig` the adapters were injected with; its targets,
        ranks and alphas must give exactly the tree's adapters.
      path: the adapter directory: new, empty, or an adapter directory (jlora's or PEFT's)
        whose adapter files are replaced.
      base_model_name_or_path: recorded in the config (the transformers model to load); as
        a local directory, never written to.
      task_type: PEFT's ``task_type``; defaults to ``"CAUSAL_LM"`` for decoders and
        ``"FEATURE_EXTRACTION"`` for BERT when the model type is known, else ``None``.
      model_type: the config.json ``model_type`` (``"gpt2"``, ``"llama"``, ...), needed for
        ``fan_in_fan_out`` on GPT-2; read from ``hf_config`` when that is given, else from
        the config.json of ``base_model_name_or_path`` when that is a local directory. When
        it stays unknown and ``base_model_name_or_path`` is given, a
        :class:`PeftExportWarning` says what the export could not set.
      hf_config: the config.json dict, as :func:`jlora.hf.load.load` returns it.
      overwrite: also write into the current directory (or a parent of it) or a directory
        holding other files; the adapter's two files there are replaced, the others kept.

    Returns:
      The directory written.

    Named adapters (PEFT's layout): ``name='default'`` writes to ``path``, another name to
    ``path/<name>``, with only that adapter's tensors and ``config``; the other adapters'
    files under ``path`` stay in place. ``PeftModel.load_adapter(path/<name>,
    adapter_name=name)`` reads it, and :func:`load_peft` with ``name=`` reads it back.

    Raises:
      OutputPathError: ``path`` is refused (the message says why and what to do instead).
      HFError: an argument of the wrong type, no adapters, an adapter PEFT cannot represent
        (more than two axes, GPT-2's ``wte`` tied to the head, a trainable copy of a tied
        input embedding), a trainable copy of a kernel while the model type is unknown (its
        transformers layout depends on it), or the directory cannot be written.
      ConfigError: ``config`` does not give the tree's adapters (other targets, ranks,
        scales, ``use_dora``, or other trainable copies).

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> base = {"params": {"q": {"kernel": jnp.ones((4, 6))}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q"])
      >>> p = jlora.inject(base, cfg, jax.random.key(0))
      >>> out = save_peft(p, cfg, tempfile.mkdtemp() + "/adapter")
      >>> sorted(f.name for f in out.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> back, cfg2 = load_peft(base, out)
      >>> a, a2 = p["params"]["q"]["kernel_lora_a"], back["params"]["q"]["kernel_lora_a"]
      >>> cfg2 == cfg, bool((a == a2).all())
      (True, True)
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a jlora.LoraConfig, got {type(config).__name__}.")
    base = _check_args(base_model_name_or_path, task_type, model_type, hf_config)
    tree = P.params_of(params)
    P.check_adapters(tree, "save_peft")
    P.check_name(name, "save_peft")
    names = P.adapter_names(tree)
    if names:
        P.require_names(tree, name, "save_peft")
    if names and names != (P.DEFAULT_ADAPTER,):  # one adapter's file: the others stay out
        tree = P.params_of(adapters_mod.rename(adapters_mod.select(tree, name), name,
                                               P.DEFAULT_ADAPTER))
    if name != P.DEFAULT_ADAPTER:
        path = Path(path) / name
    check_target(path, PEFT_ADAPTER, overwrite=overwrite, base=base)
    adapters, copies = _adapters(tree)
    if not adapters:
        raise HFError("save_peft: this tree holds no LoRA adapters (a tree merged with "
                      "unload=True has none left); export the tree jlora.inject or "
                      "jlora.hf.load_peft returned.")
    for ad in adapters:
        if np.ndim(ad.a) != 2 or np.ndim(ad.b) != 2:
            raise HFError(f"{ad.module}.{ad.param} has a {np.ndim(ad.a) + np.ndim(ad.b) - 2}-axis "
                          "kernel: PEFT's LoRA layers hold 2-D matrices only; export the "
                          "merged model with jlora.hf.save_merged instead.")
    hf_config, spec, unknown = model_config(hf_config, model_type, base)
    if spec is None and base is not None:
        warn_unknown_model(unknown, "the adapter_config.json gets no task_type and "
                           "fan_in_fan_out=false (GPT-2's Conv1D layers need true)")
    _check_matches_config(tree, adapters, copies, config)
    tied = _tied_head(tree, spec, hf_config)
    tensors = _tensors(adapters, copies, spec, tied)
    config, extra = _tie_embedding_adapter(tensors, adapters, config, tied)
    targets: Any = config.targets
    if targets == P.ALL_LINEAR or (tied and config.matches("lm_head")):
        # PEFT resolves "all-linear" to module paths itself; and on a tied model PEFT would
        # also adapt the transformers lm_head that jlora's tree lacks: list what was adapted.
        targets = sorted(ad.module for ad in adapters)
    fan = bool(spec is not None and any(
        ad.param == "kernel" and suffix_in(ad.module, spec.fan_in_fan_out) for ad in adapters))
    if task_type is None and spec is not None:
        task_type = _TASK_TYPES.get(spec.auto_class)
    peft_config = config.to_peft(
        task_type=task_type,
        base_model_name_or_path=base,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        fan_in_fan_out=fan,
        **extra,
    )

    with write_output(path, PEFT_ADAPTER, overwrite=overwrite, base=base) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return Path(path)


def _tensors(adapters: list[_Adapter], copies: list[_Copy], spec: Any,
             tied: bool) -> dict[str, np.ndarray]:
    """The adapter file's tensors, under PEFT's names and in its layouts (float32)."""
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    tensors: dict[str, np.ndarray] = {}
    for ad in adapters:
        ka, kb = tensor_keys(ad.module, ad.param)
        tensors[ka], tensors[kb] = f32(np.asarray(ad.a).T), f32(np.asarray(ad.b).T)
        if ad.magnitude is not None:
            tensors[f"{PREFIX}{ad.module}{MAGNITUDE_KEY}"] = f32(ad.magnitude)
    adapted = {ad.module for ad in adapters}
    for c in copies:
        if tied and suffix_in(c.module, TIED_EMBEDDINGS) and c.param == "embedding":
            raise HFError(f"{c.module!r} is the input embedding this model ties to its output "
                          "head: a trainable copy of it changes the head in jlora, and PEFT "
                          "would leave the head as it was. Export the merged model with "
                          "jlora.hf.save_merged instead, or do not save this module.")
        key, transposed = copy_key(c.module, c.param, np.shape(c.value), spec,
                                   c.module in adapted)
        tensors[key] = f32(np.asarray(c.value).T if transposed else c.value)
    return tensors


def _tie_embedding_adapter(tensors: dict[str, np.ndarray], adapters: list[_Adapter],
                           config: LoraConfig, tied: bool) -> tuple[LoraConfig, dict[str, Any]]:
    """jlora's tied head reads the embedding's adapter too (x @ B.T @ A.T * scale); PEFT
    reproduces it with ensure_weight_tying: lm_head gets lora_A = B, lora_B = A. Adds those
    tensors; returns the config with the head's rank/alpha patterns, and the extra fields."""
    tied_emb = [ad for ad in adapters if tied and ad.param == "embedding"
                and suffix_in(ad.module, TIED_EMBEDDINGS)]
    if not tied_emb:
        return config, {}
    ad = tied_emb[0]
    if not suffix_in(ad.module, PEFT_TIEABLE):
        raise HFError(
            f"{ad.module!r} is the input embedding this model ties to its output head: "
            "jlora adapts the tied head with it, and PEFT can tie an adapter only for "
            f"{', '.join(PEFT_TIEABLE)}. Exclude it from the targets (exclude=[...]), or "
            "export the merged model with jlora.hf.save_merged.")
    emb_a, emb_b = (tensors[k] for k in tensor_keys(ad.module, ad.param))
    tensors[f"{PREFIX}{TIED_HEAD}{KERNEL_KEYS[0]}"] = np.ascontiguousarray(emb_b.T)
    tensors[f"{PREFIX}{TIED_HEAD}{KERNEL_KEYS[1]}"] = np.ascontiguousarray(emb_a.T)
    rank, alpha = int(np.shape(ad.a)[-1]), config.alpha_for(ad.module)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    if config.rank_for(TIED_HEAD) != rank:
        rank_pattern[TIED_HEAD] = rank
    if config.alpha_for(TIED_HEAD) != alpha:
        alpha_pattern[TIED_HEAD] = alpha
    config = dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return config, {"ensure_weight_tying": True}


def _check_args(base: Any, task_type: Any, model_type: Any, hf_config: Any) -> str | None:
    """save_peft's optional arguments, type-checked; returns base_model_name_or_path as str."""
    if isinstance(base, os.PathLike):
        base = os.fspath(base)
    named = {"base_model_name_or_path": base, "task_type": task_type, "model_type": model_type}
    for name, value in named.items():
        if value is not None and not isinstance(value, str):
            kind = type(value).__name__
            raise HFError(f"save_peft: {name} must be a str or None, got {kind} {value!r}")
    if hf_config is not None and not isinstance(hf_config, Mapping):
        raise HFError(
            "save_peft: hf_config must be the config.json dict (jlora.hf.load's third result) "
            f"or None, got {type(hf_config).__name__}"
        )
    return base


def _tied_head(tree: Any, spec: Any, hf_config: Mapping[str, Any] | None) -> bool:
    """Whether the model ties its output head to the input embedding (no lm_head param)."""
    if spec is None or spec.auto_class != "AutoModelForCausalLM":
        return False
    if hf_config is not None and "tie_word_embeddings" in hf_config:
        return bool(hf_config["tie_word_embeddings"])
    return not any(p.split(".", 1)[0] == "lm_head" for p, _ in P.leaves_with_paths(tree))


def _check_matches_config(tree: Any, adapters: list[_Adapter], copies: list[_Copy],
                          config: LoraConfig) -> None:
    """The config must give the tree's adapters: same modules, ranks, scales, DoRA or not,
    and the same trainable copies."""
    try:
        p = plan(_strip_adapters(tree), config)
        expected = {e.module: e for e in p}
    except (TargetError, ConfigError) as e:
        raise ConfigError(f"config does not fit this tree's adapters ({e}); pass the "
                          "LoraConfig the adapters were injected with.") from None
    got = {ad.module: ad for ad in adapters}
    extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"adapted but not targeted by the config: {listed(extra)}")
        if missing:
            parts.append(f"targeted by the config but not adapted: {listed(missing)}")
        raise ConfigError("config does not give this tree's adapters (" + "; ".join(parts) +
                          "); pass the LoraConfig the adapters were injected with.")
    for module, ad in got.items():
        e = expected[module]
        rank = int(np.shape(ad.a)[-1])
        if rank != e.rank:
            raise ConfigError(f"{module}: the tree's adapter has rank {rank}, the config gives "
                              f"{e.rank}; pass the LoraConfig the adapters were injected with "
                              "(or set rank_pattern for this module).")
        scale = float(np.asarray(ad.scale, np.float32))
        if scale != float(np.float32(e.scaling)):
            raise ConfigError(f"{module}: the tree's adapter has scale {scale:g}, the config "
                              f"gives {e.scaling:g} (alpha {e.alpha:g}, rank {e.rank}, "
                              f"use_rslora={config.use_rslora}); pass the LoraConfig the "
                              "adapters were injected with (or set alpha_pattern).")
        if (ad.magnitude is not None) != config.use_dora:
            kind = "a DoRA adapter" if ad.magnitude is not None else "a plain LoRA adapter"
            raise ConfigError(f"{module}: the tree holds {kind}, the config has use_dora="
                              f"{config.use_dora}; pass the LoraConfig the adapters were "
                              "injected with.")
    have = {f"{c.module}.{c.param}" if c.module else c.param for c in copies}
    want = {path for path, _ in p.copies}
    if have != want:
        parts = [f"{what}: {listed(names)}" for what, names in (
            ("copied in the tree but not by the config", have - want),
            ("copied by the config (modules_to_save, bias) but not in the tree", want - have))
            if names]
        raise ConfigError("config does not give this tree's trainable copies (" +
                          "; ".join(parts) + "); pass the LoraConfig the adapters were "
                          "injected with.")


__all__ = ["CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "PeftExportWarning", "load_peft",
           "save_peft"]
