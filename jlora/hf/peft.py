"""PEFT adapter export and import: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are the ones ``peft.PeftModel.save_pretrained`` writes for a LoRA adapter, so that
``peft.PeftModel.from_pretrained(transformers_model, path)`` runs the adapter trained in jlora
with the same outputs, and an adapter trained in PyTorch loads into jlora.

Layouts (jlora -> PEFT; the module path is the same on both sides):

* a kernel (in, out): ``<module>.lora_A.weight`` = A.T (r, in) and ``<module>.lora_B.weight``
  = B.T (out, r). GPT-2's ``Conv1D`` layers (``fan_in_fan_out``) use the same shapes: PEFT's
  lora_A/lora_B are ``nn.Linear`` whatever the base layer.
* an embedding (vocab, features): ``<module>.lora_embedding_A`` = A.T (r, vocab) and
  ``<module>.lora_embedding_B`` = B.T (features, r).

Every key carries PEFT's ``base_model.model.`` prefix; tensors are float32 with metadata
``{"format": "pt"}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import ConfigError, HFError, ShapeError, TargetError
from jlora.hf.io import TensorInfo, atomic_dir, read_header, read_tensor, write_safetensors
from jlora.inject import inject, plan

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT's tensor-name suffixes, per adapted param kind: (A, B).
_KERNEL_KEYS = (".lora_A.weight", ".lora_B.weight")
_EMBED_KEYS = (".lora_embedding_A", ".lora_embedding_B")
# What PEFT's save_embedding_layers adds beside an adapted embedding: the base weight.
_BASE_LAYER_KEY = ".base_layer.weight"
# task_type per transformers Auto class of jlora's models.
_TASK_TYPES = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModel": "FEATURE_EXTRACTION"}
# Input embeddings that a causal LM ties to its output head when it has no ``lm_head``, and
# the ones PEFT can tie an adapter for (``ensure_weight_tying``; its EMBEDDING_LAYER_NAMES).
_TIED_EMBEDDINGS = ("embed_tokens", "wte")
_PEFT_TIEABLE = ("embed_tokens",)
TIED_HEAD = "lm_head"
_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class _Adapter:
    module: str
    param: str  # "kernel" or "embedding"
    a: Any
    b: Any
    scale: Any


def _listed(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:_MAX_LISTED]) + more


def _keys(module: str, param: str) -> tuple[str, str]:
    a, b = _EMBED_KEYS if param == "embedding" else _KERNEL_KEYS
    return f"{PREFIX}{module}{a}", f"{PREFIX}{module}{b}"


def _adapters(tree: Any) -> list[_Adapter]:
    out: list[_Adapter] = []

    def fn(module, leaves):
        for param in P.adapter_params(leaves):
            scale = leaves.get(param + P.SCALE_SUFFIX, leaves.get(param + P.MERGED_SUFFIX))
            if scale is None or param + P.B_SUFFIX not in leaves:
                raise HFError(f"{module}.{param} has an incomplete adapter (A without B or "
                              "scale); export a tree made by jlora.inject or jlora.hf.load_peft.")
            out.append(_Adapter(module, param, P.unbox(leaves[param + P.A_SUFFIX]),
                                P.unbox(leaves[param + P.B_SUFFIX]), P.unbox(scale)))
        return leaves

    P.map_modules(tree, fn)
    return sorted(out, key=lambda x: x.module)


def _strip_adapters(tree: Any) -> Any:
    return P.map_modules(tree, lambda _, ls: {k: v for k, v in ls.items()
                                               if not P.is_adapter_name(k)})


def _suffix_in(module: str, suffixes) -> bool:
    return any(module == s or module.endswith(f".{s}") for s in suffixes)


def _spec(model_type: str | None, hf_config: Mapping[str, Any] | None):
    if model_type is None and hf_config is not None:
        model_type = hf_config.get("model_type")
    if model_type is None:
        return None
    from jlora.models import arch_spec

    return arch_spec(model_type)


def save_peft(
    params: Any,
    config: LoraConfig,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    model_type: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the adapters of ``params`` as a PEFT LoRA adapter directory.

    ``path`` receives ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
    ``peft.PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained`` on the
    transformers model gives jlora's outputs. The config written holds every field that
    changes the math (``r``, ``lora_alpha``, ``target_modules`` with ``"all-linear"`` resolved
    to the adapted module paths, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
    ``use_dora``, ``fan_in_fan_out`` for GPT-2 ``Conv1D`` targets, ``lora_dropout``,
    ``layers_to_transform``, ``exclude_modules``, ``init_lora_weights``).

    Every check runs before anything is written, and the directory is written atomically:
    an interrupted export leaves ``path`` as it was. A merged tree (after ``jlora.merge(p)``)
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
      path: the adapter directory to create (an existing one is replaced).
      base_model_name_or_path: recorded in the config (the transformers model to load).
      task_type: PEFT's ``task_type``; defaults to ``"CAUSAL_LM"`` for decoders and
        ``"FEATURE_EXTRACTION"`` for BERT when the model type is known, else ``None``.
      model_type: the config.json ``model_type`` (``"gpt2"``, ``"llama"``, ...), needed for
        ``fan_in_fan_out`` on GPT-2; read from ``hf_config`` when that is given.
      hf_config: the config.json dict, as :func:`jlora.hf.load.load` returns it.

    Returns:
      The directory written.

    Raises:
      HFError: no adapters, an adapter PEFT cannot represent (more than two axes, GPT-2's
        ``wte`` tied to the head), or the directory cannot be written.
      ConfigError: ``config`` does not give the tree's adapters (other targets, ranks or
        scales).

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
    tree = P.params_of(params)
    adapters = _adapters(tree)
    if not adapters:
        raise HFError("save_peft: this tree holds no LoRA adapters (a tree merged with "
                      "unload=True has none left); export the tree jlora.inject or "
                      "jlora.hf.load_peft returned.")
    for ad in adapters:
        if np.ndim(ad.a) != 2 or np.ndim(ad.b) != 2:
            raise HFError(f"{ad.module}.{ad.param} has a {np.ndim(ad.a) + np.ndim(ad.b) - 2}-axis "
                          "kernel: PEFT's LoRA layers hold 2-D matrices only; export the "
                          "merged model with jlora.hf.save_merged instead.")
    spec = _spec(model_type, hf_config)
    _check_matches_config(tree, adapters, config)

    tensors: dict[str, np.ndarray] = {}
    for ad in adapters:
        ka, kb = _keys(ad.module, ad.param)
        tensors[ka] = np.ascontiguousarray(np.asarray(ad.a, np.float32).T)
        tensors[kb] = np.ascontiguousarray(np.asarray(ad.b, np.float32).T)

    modules = [ad.module for ad in adapters]
    tied = _tied_head(tree, spec, hf_config)
    extra: dict[str, Any] = {}
    tied_emb = [ad for ad in adapters if tied and ad.param == "embedding"
                and _suffix_in(ad.module, _TIED_EMBEDDINGS)]
    if tied_emb:
        # jlora's tied head reads the embedding's adapter too (x @ B.T @ A.T * scale); PEFT
        # reproduces it with ensure_weight_tying: lm_head gets lora_A = B, lora_B = A.
        ad = tied_emb[0]
        if not _suffix_in(ad.module, _PEFT_TIEABLE):
            raise HFError(
                f"{ad.module!r} is the input embedding this model ties to its output head: "
                "jlora adapts the tied head with it, and PEFT can tie an adapter only for "
                f"{', '.join(_PEFT_TIEABLE)}. Exclude it from the targets (exclude=[...]), or "
                "export the merged model with jlora.hf.save_merged.")
        emb_a, emb_b = (tensors[k] for k in _keys(ad.module, ad.param))
        tensors[f"{PREFIX}{TIED_HEAD}{_KERNEL_KEYS[0]}"] = np.ascontiguousarray(emb_b.T)
        tensors[f"{PREFIX}{TIED_HEAD}{_KERNEL_KEYS[1]}"] = np.ascontiguousarray(emb_a.T)
        extra["ensure_weight_tying"] = True
        rank, alpha = int(np.shape(ad.a)[-1]), config.alpha_for(ad.module)
        rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
        if config.rank_for(TIED_HEAD) != rank:
            rank_pattern[TIED_HEAD] = rank
        if config.alpha_for(TIED_HEAD) != alpha:
            alpha_pattern[TIED_HEAD] = alpha
        extra["rank_pattern"] = rank_pattern
        extra["alpha_pattern"] = {k: _num(v) for k, v in alpha_pattern.items()}
    targets: Any = config.targets
    if targets == P.ALL_LINEAR or (tied and config.matches("lm_head")):
        # PEFT resolves "all-linear" to module paths itself; and on a tied model PEFT would
        # also adapt the transformers lm_head that jlora's tree lacks: list what was adapted.
        targets = sorted(modules)
    fan = bool(spec is not None and any(
        ad.param == "kernel" and _suffix_in(ad.module, spec.fan_in_fan_out) for ad in adapters))
    if task_type is None and spec is not None:
        task_type = _TASK_TYPES.get(spec.auto_class)
    peft_config = config.to_peft(
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        fan_in_fan_out=fan,
        **extra,
    )

    with atomic_dir(path) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return Path(path)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _tied_head(tree: Any, spec: Any, hf_config: Mapping[str, Any] | None) -> bool:
    """Whether the model ties its output head to the input embedding (no lm_head param)."""
    if spec is None or spec.auto_class != "AutoModelForCausalLM":
        return False
    if hf_config is not None and "tie_word_embeddings" in hf_config:
        return bool(hf_config["tie_word_embeddings"])
    return not any(p.split(".", 1)[0] == "lm_head" for p, _ in P.leaves_with_paths(tree))


def _check_matches_config(tree: Any, adapters: list[_Adapter], config: LoraConfig) -> None:
    """The config must give the tree's adapters: same modules, ranks and scales."""
    try:
        expected = {e.module: e for e in plan(_strip_adapters(tree), config)}
    except (TargetError, ConfigError) as e:
        raise ConfigError(f"config does not fit this tree's adapters ({e}); pass the "
                          "LoraConfig the adapters were injected with.") from None
    got = {ad.module: ad for ad in adapters}
    extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"adapted but not targeted by the config: {_listed(extra)}")
        if missing:
            parts.append(f"targeted by the config but not adapted: {_listed(missing)}")
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


# --------------------------------------------------------------------------- import


def _read_config(path: Path) -> dict[str, Any]:
    what = ("a PEFT adapter directory (what PeftModel.save_pretrained writes) holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if not path.is_dir():
        raise HFError(f"{str(path)!r} is not a directory; {what}.")
    if not (path / CONFIG_FILE).is_file():
        raise HFError(f"{str(path)!r} has no {CONFIG_FILE}; {what}.")
    try:
        d = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{str(path / CONFIG_FILE)!r} is not valid JSON ({e}).") from None
    if not isinstance(d, dict):
        raise HFError(f"{str(path / CONFIG_FILE)!r} is not a JSON object; {what}.")
    if not (path / WEIGHTS_FILE).is_file():
        hint = (" (it has adapter_model.bin: re-save it with PeftModel.save_pretrained(..., "
                "safe_serialization=True))" if (path / "adapter_model.bin").is_file() else "")
        raise HFError(f"{str(path)!r} has no {WEIGHTS_FILE}{hint}; {what}.")
    return d


def _replace(leaf: Any, value: np.ndarray, dtype: Any = None) -> Any:
    """``value`` in place of a leaf, keeping its box and sharding (and dtype by default)."""
    inner = P.unbox(leaf)
    new = jnp.asarray(value, dtype=inner.dtype if dtype is None else dtype)
    sharding = getattr(inner, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        new = jax.device_put(new, sharding)
    return leaf.replace_boxed(new) if P.is_box(leaf) else new


def load_peft(
    params: Any, path: str | os.PathLike, *, dtype: Any = None
) -> tuple[Any, LoraConfig]:
    """Loads a PEFT LoRA adapter directory onto base params.

    Reads what ``peft.PeftModel.save_pretrained`` (or :func:`save_peft`) wrote and returns
    the tree :func:`jlora.inject` would build for the adapter's config, with A and B taken
    from the file and each scale from the config's per-module rank and alpha (and
    ``use_rslora``). Everything is checked on the safetensors header before any tensor is
    read. As PEFT does, ``init_lora_weights='pissa'``/``'olora'`` rewrites the adapted base
    kernels to their residual before the trained A and B are loaded, and a base embedding
    weight saved beside an adapted embedding (PEFT's ``save_embedding_layers``) replaces it.
    With ``ensure_weight_tying`` on a tied model (no ``lm_head`` param), the file's ``lm_head``
    adapter must be the embedding's (transposed, same rank and alpha): jlora's tied head reads
    the embedding's adapter itself.

    Args:
      params: base params (``{'params': ...}`` or bare) without adapters, e.g. from
        :func:`jlora.hf.load.load`.
      path: the adapter directory.
      dtype: dtype of A and B; by default the one :func:`jlora.inject` picks (the kernel's,
        float32 for a half-precision base). Scales stay float32.

    Returns:
      ``(params_with_adapters, config)``: the same kind of tree as ``params`` and the
      adapter's :class:`jlora.LoraConfig`.

    Raises:
      HFError: not an adapter directory, missing or unexpected tensors, a truncated file.
      ConfigError: another ``peft_type`` or a LoRA feature jlora does not reproduce.
      TargetError: the adapter's target modules are absent from this model.
      ShapeError: a tensor whose shape does not fit its module's kernel and rank.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> base = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> cfg = jlora.LoraConfig(rank=2, targets=["q"], init="random")
      >>> out = save_peft(jlora.inject(base, cfg, jax.random.key(0)), cfg, tempfile.mkdtemp())
      >>> params, config = load_peft(base, out)
      >>> params["q"]["kernel_lora_b"].shape, config.rank
      ((2, 6), 2)
    """
    path = Path(path)
    d = _read_config(path)
    tree = P.params_of(params)
    leaves = _module_leaves(tree)
    # PEFT ties an adapter on lm_head to the input embedding's (ensure_weight_tying); jlora's
    # tied head (no lm_head param) reads the embedding's adapter by itself.
    tie = bool(d.get("ensure_weight_tying")) and TIED_HEAD not in leaves
    head_patterns = {}
    if tie:
        d = dict(d)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = dict(d.get(name) or {})
            head_patterns[name] = pattern.pop(TIED_HEAD, None)
            d[name] = pattern
    config = LoraConfig.from_peft(d)
    index = read_header(path / WEIGHTS_FILE)
    adapted = sorted(p for p, _ in P.leaves_with_paths(tree) if P.is_adapter_name(p))
    if adapted:
        raise HFError(f"load_peft needs base params, but this tree holds adapters already "
                      f"({adapted[0]}, ...); pass the base tree, or jlora.merge(params, "
                      "unload=True) first.")

    # What the file holds, per module: {module: {suffix: TensorInfo}}, and stray keys.
    by_module: dict[str, dict[str, TensorInfo]] = {}
    stray: list[str] = []
    for name, info in index.items():
        suffix = next((x for x in (*_KERNEL_KEYS, *_EMBED_KEYS, _BASE_LAYER_KEY)
                       if name.startswith(PREFIX) and name.endswith(x)), None)
        if suffix is None:
            stray.append(name)
        else:
            by_module.setdefault(name[len(PREFIX): -len(suffix)], {})[suffix] = info
    head = by_module.pop(TIED_HEAD, {}) if tie else {}

    absent = sorted(m for m in by_module if m not in leaves)
    if absent:
        name = d.get("base_model_name_or_path")
        trained_on = f" ({name!r})" if name else ""
        near = P.nearest(absent[0], [m for m in leaves if m])
        raise TargetError(
            f"the adapter in {str(path)!r} has tensors for modules this model does not have: "
            f"{_listed(absent)} (nearest module paths: {', '.join(near)}). Load it onto the "
            f"base model it was trained on{trained_on}.")

    try:
        entries = {e.module: e for e in plan(params, dataclasses.replace(config, init="default"))}
    except TargetError as e:
        raise TargetError(f"the adapter in {str(path)!r} does not fit this model: {e}") from None

    problems: list[str] = []
    unexpected: list[str] = list(stray)
    tied_with = _check_tied_head(path, head, head_patterns, entries, config) if tie else None
    missing: list[str] = []
    shape_errors: list[str] = []
    for module, found in by_module.items():
        e = entries.get(module)
        if e is None:
            unexpected += [i.name for i in found.values()]
            continue
        found = dict(found)
        for i, key in enumerate(_keys(module, e.param)):
            info = found.pop(key[len(PREFIX) + len(module):], None)
            if info is None:
                missing.append(key)
                continue
            want = ((e.rank, e.shape[0]), (e.shape[1], e.rank))[i]
            if info.shape != want:
                shape_errors.append(
                    f"{info.name!r} has shape {info.shape}, but {module}.{e.param} {e.shape} "
                    f"with rank {e.rank} needs {want}")
        base = found.pop(_BASE_LAYER_KEY, None) if e.param == "embedding" else None
        if base is not None and base.shape != e.shape:
            shape_errors.append(f"{base.name!r} has shape {base.shape}, but "
                                f"{module}.embedding is {e.shape}")
        unexpected += [i.name for i in found.values()]
    for module, e in entries.items():
        if module not in by_module:
            missing += list(_keys(module, e.param))
    if shape_errors:
        raise ShapeError(f"the adapter in {str(path)!r} does not fit this model: " +
                         "; ".join(shape_errors[:_MAX_LISTED]) + ". Load it onto the base "
                         "model it was trained on, with its adapter_config.json.")
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listed(unexpected)}")
    if problems:
        raise HFError(f"the adapter in {str(path)!r} does not match its {CONFIG_FILE} "
                      f"(target_modules={d.get('target_modules')!r}): " + ". ".join(problems) +
                      ". Re-export it with PeftModel.save_pretrained or jlora.hf.save_peft.")

    # Base embeddings PEFT saved beside their adapter replace the base (as PEFT loads them).
    bases = {m: found[_BASE_LAYER_KEY] for m, found in by_module.items()
             if _BASE_LAYER_KEY in found}
    if bases:
        def put_base(module, ls):
            if module not in bases:
                return ls
            out = dict(ls)
            leaf = ls["embedding"]
            out["embedding"] = _replace(leaf, read_tensor(bases[module]))
            return out

        params = P.with_params(params, P.map_modules(tree, put_base))

    init = config.init if config.init.startswith(("pissa", "olora")) else "default"
    injected = inject(params, dataclasses.replace(config, init=init), jax.random.key(0))

    def fill(module, ls):
        e = entries.get(module)
        if e is None:
            return ls
        out = dict(ls)
        ka, kb = _keys(module, e.param)
        for suffix, key in ((P.A_SUFFIX, ka), (P.B_SUFFIX, kb)):
            name = e.param + suffix
            out[name] = _replace(ls[name], read_tensor(index[key]).T, dtype)
        return out

    new_tree = P.map_modules(P.params_of(injected), fill)
    if tied_with is not None:  # the head's tensors must be the embedding's, transposed
        e = entries[tied_with]
        emb = _module_leaves(new_tree)[tied_with]
        for key, mine in ((_KERNEL_KEYS[0], e.param + P.B_SUFFIX),
                          (_KERNEL_KEYS[1], e.param + P.A_SUFFIX)):
            theirs = read_tensor(head[key])  # lora_A = B (r, features), lora_B = A
            if not np.allclose(theirs, np.asarray(P.unbox(emb[mine]), np.float32),
                               rtol=1e-3, atol=1e-6):
                raise HFError(f"{head[key].name!r} is not the tied transpose of "
                              f"{tied_with}'s adapter, though ensure_weight_tying is set; jlora "
                              "adapts a tied head with the embedding's own adapter.")
    return P.with_params(injected, new_tree), config


def _check_tied_head(path, head, head_patterns, entries, config) -> str | None:
    """Checks PEFT's tied lm_head adapter against the embedding's; returns that module."""
    emb = [e for e in entries.values() if e.param == "embedding"
           and _suffix_in(e.module, _PEFT_TIEABLE)]
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
    want = {_KERNEL_KEYS[0]: (e.rank, e.shape[1]), _KERNEL_KEYS[1]: (e.shape[0], e.rank)}
    base = head.get(_BASE_LAYER_KEY)
    if set(head) - {_BASE_LAYER_KEY} != set(want) or any(
            head[k].shape != v for k, v in want.items()) or (
            base is not None and base.shape != (e.shape[0], e.shape[1])):
        got = {i.name: i.shape for i in head.values()}
        raise ShapeError(f"the adapter in {str(path)!r} ties {TIED_HEAD} to {e.module} but "
                         f"holds {got}; expected lora_A {want[_KERNEL_KEYS[0]]} and lora_B "
                         f"{want[_KERNEL_KEYS[1]]}.")
    return e.module


def _module_leaves(tree: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p, leaf in P.leaves_with_paths(tree):
        module, name = P.split_path(p)
        out.setdefault(module, {})[name] = leaf
    return out


__all__ = ["CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "load_peft", "save_peft"]
