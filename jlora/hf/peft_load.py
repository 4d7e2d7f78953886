"""PEFT adapter import: :func:`load_peft` reads what ``PeftModel.save_pretrained`` writes.

The layout (tensor names and shapes) is the one described in :mod:`jlora.hf.peft_layout`;
:func:`jlora.hf.peft.save_peft` writes it. ``load_peft`` takes four steps, one function each:
read the config (:func:`_read_adapter_config`), map the file's tensor names to modules and
roles (:func:`_map_names`, then :func:`_expect` for what the config gives this model), check
names and shapes against each other (:func:`_check_tensors`), and place the leaves
(:func:`_place`). Every check reads the safetensors header only: no tensor is read before
they all pass.
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

from jlora import adapters
from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import AlreadyInjectedError, HFError, ShapeError, TargetError
from jlora.hf.io import TensorInfo, read_header, read_tensor
from jlora.hf.load import check_dtype, check_path
from jlora.hf.output import settle
from jlora.hf.peft_layout import (
    BASE_LAYER_KEY,
    CONFIG_FILE,
    EMBED_KEYS,
    KERNEL_KEYS,
    MAGNITUDE_KEY,
    MAX_LISTED,
    PREFIX,
    TIED_HEAD,
    WEIGHTS_FILE,
    check_tied_head,
    check_tied_values,
    copy_key,
    listed,
    model_config,
    module_leaves,
    tensor_keys,
)
from jlora.inject import PlanEntry, inject, plan

# The tensor-name suffixes of a module's adapter (what _map_names sorts by module).
_ADAPTER_KEYS = (*KERNEL_KEYS, *EMBED_KEYS, BASE_LAYER_KEY, MAGNITUDE_KEY)


@dataclasses.dataclass(frozen=True)
class _AdapterConfig:
    """Step 1: the adapter's config, and how a tied head is handled."""

    raw: dict[str, Any]  # adapter_config.json as read
    config: LoraConfig
    tie: bool  # PEFT's ensure_weight_tying on a model without an lm_head param
    head_patterns: dict[str, Any]  # the rank/alpha pattern entries PEFT gave the tied head


@dataclasses.dataclass(frozen=True)
class _Found:
    """Step 2a: the file's tensors by role."""

    adapters: dict[str, dict[str, TensorInfo]]  # module -> {suffix: info}
    others: dict[str, TensorInfo]  # every other key (trainable copies, or stray)
    head: dict[str, TensorInfo]  # the tied lm_head's adapter (with ensure_weight_tying)


@dataclasses.dataclass(frozen=True)
class _CopyKey:
    """Where PEFT keeps the trainable copy of ``<module>.<param>``."""

    module: str
    param: str
    shape: tuple[int, ...]  # jlora's
    transposed: bool  # stored as the transpose (torch's (out, in) of an nn.Linear kernel)


@dataclasses.dataclass(frozen=True)
class _Expected:
    """Step 2b: what the config gives this model."""

    entries: dict[str, PlanEntry]  # module -> its adapter
    copies: dict[str, _CopyKey]  # PEFT key -> the copy


def load_peft(
    params: Any, path: str | os.PathLike, *, dtype: Any = None,
    hf_config: Mapping[str, Any] | None = None, name: str = P.DEFAULT_ADAPTER,
) -> tuple[Any, LoraConfig]:
    """Loads a PEFT LoRA adapter directory onto base params.

    Reads what ``peft.PeftModel.save_pretrained`` (or :func:`jlora.hf.save_peft`) wrote and returns
    the tree :func:`jlora.inject` would build for the adapter's config, with A and B (DoRA's
    magnitudes, the trainable copies of ``modules_to_save`` and of the ``bias`` mode) taken
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
      dtype: dtype of A, B and DoRA's magnitude; by default the one :func:`jlora.inject`
        picks (the kernel's, float32 for a half-precision base). Scales stay float32, copies
        take their param's dtype.
      hf_config: the base model's config.json dict (:func:`jlora.hf.load.load`'s third
        result). It gives the transformers names and layouts of the trainable copies
        (GPT-2's Conv1D kernels are stored (in, out)); without it they are read from the
        config.json of the adapter's ``base_model_name_or_path`` when that is a local
        directory. Needed only for copies of kernels (``modules_to_save`` of a linear
        layer): without a model type those are an HFError, never a guess.
      name: the adapter's name in the tree (PEFT's ``adapter_name``). Another name than
        ``'default'`` reads ``path/<name>`` when that folder holds an adapter (PEFT's layout:
        the default adapter at the root, the others in subfolders named after them), else
        ``path`` itself (as ``PeftModel.load_adapter(path, adapter_name=name)``). The adapter
        is added beside those ``params`` already holds.

    Returns:
      ``(params_with_adapters, config)``: the same kind of tree as ``params`` and the
      adapter's :class:`jlora.LoraConfig`.

    Raises:
      HFError: a ``path``, ``dtype`` or ``hf_config`` of the wrong kind (``dtype`` must be a
        float dtype), not an adapter directory, missing or unexpected tensors, a truncated
        file, a copy of a kernel while the model type is unknown.
      ConfigError: an ``adapter_config.json`` field of the wrong type or value, another
        ``peft_type``, or a LoRA feature jlora does not reproduce (see
        :meth:`jlora.LoraConfig.from_peft`), named with the file and the fix.
      TargetError: the adapter's target modules are absent from this model.
      ShapeError: a tensor whose shape does not fit its module's kernel and rank.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> from jlora.hf import save_peft
      >>> base = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> cfg = jlora.LoraConfig(rank=2, targets=["q"], init="random")
      >>> out = save_peft(jlora.inject(base, cfg, jax.random.key(0)), cfg, tempfile.mkdtemp())
      >>> params, config = load_peft(base, out)
      >>> params["q"]["kernel_lora_b"].shape, config.rank
      ((2, 6), 2)
    """
    path = check_path(path)
    P.check_name(name, "load_peft")
    if P.adapter_names(params) or name != P.DEFAULT_ADAPTER:
        return _load_beside(params, path, dtype, hf_config, name)
    dtype = check_dtype(dtype)
    if hf_config is not None and not isinstance(hf_config, Mapping):
        raise HFError("load_peft: hf_config must be the config.json dict (jlora.hf.load's "
                      f"third result) or None, got {type(hf_config).__name__}")
    settle(path)  # completes a save to path that a crash interrupted
    tree = P.params_of(params)
    leaves = module_leaves(tree)
    ac = _read_adapter_config(path, leaves)
    index = read_header(path / WEIGHTS_FILE)
    found = _map_names(index, ac.tie)
    expected = _expect(params, path, ac, leaves, found, hf_config)
    tied_with = (check_tied_head(path, found.head, ac.head_patterns, expected.entries,
                                  ac.config) if ac.tie else None)
    _check_tensors(path, ac.raw, found, expected)
    out = _place(params, ac.config, index, found, expected, dtype)
    if tied_with is not None:
        check_tied_values(found.head, expected.entries[tied_with],
                           module_leaves(P.params_of(out))[tied_with])
    return out, ac.config


def _load_beside(params: Any, path: Path, dtype: Any, hf_config: Any, name: str
                 ) -> tuple[Any, LoraConfig]:
    """load_peft under a name, or onto a tree that holds adapters already: the adapter is
    read onto the bare base and grafted in under ``name``."""
    tree = P.params_of(params)
    names = P.adapter_names(tree)
    if name in names:
        raise AlreadyInjectedError(
            f"load_peft: this tree already holds an adapter named {name!r} (its adapters: "
            f"{', '.join(map(repr, names))}); pass name='...' to load it beside them, or "
            f"remove it with jlora.delete_adapter(params, {name!r}).")
    merged = sorted({f"{m}.{p}" if m else p for (m, p, _), ad in
                     P.check_adapters(tree, "load_peft").items() if ad.merged})
    if merged:
        raise HFError(f"load_peft: adapters are merged into this tree's params "
                      f"({listed(merged)}), so its kernels are not the base model's; "
                      "jlora.unmerge(params) first.")
    if name != P.DEFAULT_ADAPTER and (path / name / CONFIG_FILE).is_file():
        path = path / name
    base = adapters.select(params, None) if names else params
    one, config = load_peft(base, path, dtype=dtype, hf_config=hf_config)
    return adapters.graft(params, one, name), config


# ----------------------------------------------------------------------------- 1. config


def _read_config(path: Path) -> dict[str, Any]:
    what = ("a PEFT adapter directory (what PeftModel.save_pretrained writes) holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if not path.is_dir():
        raise HFError(f"{str(path)!r} is not a directory; {what}.")
    if not (path / CONFIG_FILE).is_file():
        raise HFError(f"{str(path)!r} has no {CONFIG_FILE}; {what}.")
    try:
        d = json.loads((path / CONFIG_FILE).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{str(path / CONFIG_FILE)!r} is not valid JSON ({e}).") from None
    except (OSError, RecursionError) as e:
        why = f"{type(e).__name__}: {e}"
        raise HFError(f"{str(path / CONFIG_FILE)!r} cannot be read ({why}).") from None
    if not isinstance(d, dict):
        raise HFError(f"{str(path / CONFIG_FILE)!r} is not a JSON object; {what}.")
    if not (path / WEIGHTS_FILE).is_file():
        hint = (" (it has adapter_model.bin: re-save it with PeftModel.save_pretrained(..., "
                "safe_serialization=True))" if (path / "adapter_model.bin").is_file() else "")
        raise HFError(f"{str(path)!r} has no {WEIGHTS_FILE}{hint}; {what}.")
    return d


def _read_adapter_config(path: Path, leaves: dict[str, dict[str, Any]]) -> _AdapterConfig:
    """adapter_config.json, every field checked before any work. PEFT ties an adapter on
    lm_head to the input embedding's (ensure_weight_tying); jlora's tied head (no lm_head
    param) reads the embedding's adapter by itself, so the head's pattern entries are set
    aside (and checked against the embedding's in
    :func:`~jlora.hf.peft_layout.check_tied_head`)."""
    d = _read_config(path)
    source = repr(str(path / CONFIG_FILE))
    config = LoraConfig.from_peft(d, source=source)
    tie = bool(d.get("ensure_weight_tying", False)) and TIED_HEAD not in leaves
    head_patterns: dict[str, Any] = {}
    if tie:
        untied = dict(d)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = dict(d.get(name) or {})
            head_patterns[name] = pattern.pop(TIED_HEAD, None)
            untied[name] = pattern
        config = LoraConfig.from_peft(untied, source=source)
    return _AdapterConfig(d, config, tie, head_patterns)


# ----------------------------------------------------------------------------- 2. names


def _map_names(index: Mapping[str, TensorInfo], tie: bool) -> _Found:
    """Sorts the file's tensors: per module by adapter role (A, B, DoRA's magnitude, a saved
    base embedding), the tied head's apart, and every other name (trainable copies)."""
    adapters: dict[str, dict[str, TensorInfo]] = {}
    others: dict[str, TensorInfo] = {}
    for name, info in index.items():
        suffix = next((x for x in _ADAPTER_KEYS
                       if name.startswith(PREFIX) and name.endswith(x)), None)
        if suffix is None:
            others[name] = info
        else:
            adapters.setdefault(name[len(PREFIX): -len(suffix)], {})[suffix] = info
    head = adapters.pop(TIED_HEAD, {}) if tie else {}
    return _Found(adapters, others, head)


def _expect(params: Any, path: Path, ac: _AdapterConfig, leaves: dict[str, dict[str, Any]],
            found: _Found, hf_config: Mapping[str, Any] | None) -> _Expected:
    """The adapters and copies the config gives this model, with the copies' PEFT names."""
    absent = sorted(m for m in found.adapters if m not in leaves)
    if absent:
        name = ac.raw.get("base_model_name_or_path")
        trained_on = f" ({name!r})" if name else ""
        near = P.nearest(absent[0], [m for m in leaves if m])
        raise TargetError(
            f"the adapter in {str(path)!r} has tensors for modules this model does not have: "
            f"{listed(absent)} (nearest module paths: {', '.join(near)}). Load it onto the "
            f"base model it was trained on{trained_on}.")
    try:
        p = plan(params, dataclasses.replace(ac.config, init="default"))
    except TargetError as e:
        raise TargetError(f"the adapter in {str(path)!r} does not fit this model: {e}") from None
    entries = {e.module: e for e in p}
    copies: dict[str, _CopyKey] = {}
    if p.copies:
        base = ac.raw.get("base_model_name_or_path")
        _, spec, _ = model_config(hf_config, None, base if isinstance(base, str) else None)
        for leaf_path, shape in p.copies:
            module, param = P.split_path(leaf_path)
            key, transposed = copy_key(module, param, shape, spec, module in entries)
            copies[key] = _CopyKey(module, param, shape, transposed)
    return _Expected(entries, copies)


# ----------------------------------------------------------------------------- 3. shapes


def _check_tensors(path: Path, raw: Mapping[str, Any], found: _Found,
                   expected: _Expected) -> None:
    """Names and shapes, file against config: a tensor that does not fit is a ShapeError;
    missing or unexpected tensors an HFError listing them."""
    unexpected: list[str] = []
    missing: list[str] = []
    shape_errors: list[str] = []
    for module, tensors in found.adapters.items():
        e = expected.entries.get(module)
        if e is None:
            unexpected += [i.name for i in tensors.values()]
            continue
        want = _adapter_shapes(e)
        for suffix, shape in want.items():
            info = tensors.get(suffix)
            if info is None:
                missing.append(f"{PREFIX}{module}{suffix}")
            elif info.shape != shape:
                shape_errors.append(
                    f"{info.name!r} has shape {info.shape}, but {module}.{e.param} {e.shape} "
                    f"with rank {e.rank} needs {shape}")
        base = tensors.get(BASE_LAYER_KEY) if e.param == "embedding" else None
        if base is not None and base.shape != e.shape:
            shape_errors.append(f"{base.name!r} has shape {base.shape}, but "
                                f"{module}.embedding is {e.shape}")
        unexpected += [i.name for s, i in tensors.items() if s not in want and i is not base]
    for module, e in expected.entries.items():
        if module not in found.adapters:
            missing += [f"{PREFIX}{module}{s}" for s in _adapter_shapes(e)]
    unexpected += [key for key in found.others if key not in expected.copies]
    for key, c in expected.copies.items():
        info = found.others.get(key)
        want = c.shape[::-1] if c.transposed else c.shape
        if info is None:
            missing.append(key)
        elif info.shape != want:
            shape_errors.append(f"{key!r} has shape {info.shape}, but the trainable copy of "
                                f"{c.module}.{c.param} {c.shape} needs {want}")
    if shape_errors:
        raise ShapeError(f"the adapter in {str(path)!r} does not fit this model: " +
                         "; ".join(shape_errors[:MAX_LISTED]) + ". Load it onto the base "
                         "model it was trained on, with its adapter_config.json.")
    problems = [f"{what} tensors: {listed(names)}" for what, names in (
        ("missing", missing), ("unexpected", unexpected)) if names]
    if problems:
        raise HFError(f"the adapter in {str(path)!r} does not match its {CONFIG_FILE} "
                      f"(target_modules={raw.get('target_modules')!r}, use_dora="
                      f"{raw.get('use_dora', False)!r}, modules_to_save="
                      f"{raw.get('modules_to_save')!r}, bias={raw.get('bias', 'none')!r}): " +
                      ". ".join(problems) + ". Re-export it with PeftModel.save_pretrained or "
                      "jlora.hf.save_peft.")


def _adapter_shapes(e: PlanEntry) -> dict[str, tuple[int, ...]]:
    """PEFT's tensor suffixes and shapes of one module's adapter."""
    ka, kb = EMBED_KEYS if e.param == "embedding" else KERNEL_KEYS
    out = {ka: (e.rank, e.shape[0]), kb: (e.shape[1], e.rank)}
    if e.dora:
        out[MAGNITUDE_KEY] = (e.shape[1],)
    return out


# ----------------------------------------------------------------------------- 4. leaves


def _replace(leaf: Any, value: np.ndarray, dtype: Any = None) -> Any:
    """``value`` in place of a leaf, keeping its box and sharding (and dtype by default)."""
    inner = P.unbox(leaf)
    new = jnp.asarray(value, dtype=inner.dtype if dtype is None else dtype)
    sharding = getattr(inner, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        new = jax.device_put(new, sharding)
    return leaf.replace_boxed(new) if P.is_box(leaf) else new


def _place(params: Any, config: LoraConfig, index: Mapping[str, TensorInfo], found: _Found,
           expected: _Expected, dtype: Any) -> Any:
    """The tree :func:`jlora.inject` builds for ``config``, with the file's tensors in it.

    Base embeddings PEFT saved beside their adapter replace the base first (as PEFT loads
    them); pissa/olora rewrite the adapted kernels to their residual, as PEFT does."""
    tree = P.params_of(params)
    bases = {m: t[BASE_LAYER_KEY] for m, t in found.adapters.items() if BASE_LAYER_KEY in t}
    if bases:
        def put_base(module, ls):
            if module not in bases:
                return ls
            return {**ls, "embedding": _replace(ls["embedding"], read_tensor(bases[module]))}

        params = P.with_params(params, P.map_modules(tree, put_base))
    init = config.init if config.init.startswith(("pissa", "olora")) else "default"
    injected = inject(params, dataclasses.replace(config, init=init), jax.random.key(0))
    copies: dict[str, dict[str, tuple[str, _CopyKey]]] = {}
    for key, c in expected.copies.items():
        copies.setdefault(c.module, {})[c.param] = (key, c)

    def fill(module, ls):
        e, saved = expected.entries.get(module), copies.get(module, {})
        if e is None and not saved:
            return ls
        out = dict(ls)
        if e is not None:
            ka, kb = tensor_keys(module, e.param)
            for suffix, key in ((P.A_SUFFIX, ka), (P.B_SUFFIX, kb)):
                out[e.param + suffix] = _replace(ls[e.param + suffix], read_tensor(index[key]).T,
                                                 dtype)
            if e.dora:
                name = e.param + P.MAGNITUDE_SUFFIX
                out[name] = _replace(ls[name], read_tensor(index[PREFIX + module + MAGNITUDE_KEY]),
                                     dtype)
        for param, (key, c) in saved.items():
            value = read_tensor(index[key])
            name = param + P.SAVED_SUFFIX
            out[name] = _replace(ls[name], value.T if c.transposed else value)
        return out

    return P.with_params(injected, P.map_modules(P.params_of(injected), fill))


__all__ = ["load_peft"]
