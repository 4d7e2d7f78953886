"""PEFT adapter import: :func:`load_peft` reads what ``PeftModel.save_pretrained`` writes.

The layout (tensor names and shapes) is the one described in :mod:`jlora.hf.peft_layout`;
:func:`jlora.hf.peft.save_peft` writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import ConfigError, HFError, ShapeError, TargetError
from jlora.hf.io import TensorInfo, read_header, read_tensor
from jlora.hf.load import check_dtype, check_path
from jlora.hf.output import settle
from jlora.hf.peft_layout import (
    BASE_LAYER_KEY,
    CONFIG_FILE,
    EMBED_KEYS,
    KERNEL_KEYS,
    MAX_LISTED,
    PEFT_TIEABLE,
    PREFIX,
    TIED_HEAD,
    WEIGHTS_FILE,
    listed,
    module_leaves,
    suffix_in,
    tensor_keys,
)
from jlora.inject import inject, plan


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

    Reads what ``peft.PeftModel.save_pretrained`` (or :func:`jlora.hf.save_peft`) wrote and returns
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
      HFError: a ``path`` or ``dtype`` of the wrong kind (``dtype`` must be a float dtype),
        not an adapter directory, missing or unexpected tensors, a truncated file.
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
    dtype = check_dtype(dtype)
    settle(path)  # completes a save to path that a crash interrupted
    d = _read_config(path)
    source = repr(str(path / CONFIG_FILE))
    config = LoraConfig.from_peft(d, source=source)  # every field checked before any work
    tree = P.params_of(params)
    leaves = module_leaves(tree)
    # PEFT ties an adapter on lm_head to the input embedding's (ensure_weight_tying); jlora's
    # tied head (no lm_head param) reads the embedding's adapter by itself.
    tie = d.get("ensure_weight_tying", False) and TIED_HEAD not in leaves
    head_patterns = {}
    if tie:
        d = dict(d)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = dict(d.get(name) or {})
            head_patterns[name] = pattern.pop(TIED_HEAD, None)
            d[name] = pattern
        config = LoraConfig.from_peft(d, source=source)
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
        suffix = next((x for x in (*KERNEL_KEYS, *EMBED_KEYS, BASE_LAYER_KEY)
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
            f"{listed(absent)} (nearest module paths: {', '.join(near)}). Load it onto the "
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
        for i, key in enumerate(tensor_keys(module, e.param)):
            info = found.pop(key[len(PREFIX) + len(module):], None)
            if info is None:
                missing.append(key)
                continue
            want = ((e.rank, e.shape[0]), (e.shape[1], e.rank))[i]
            if info.shape != want:
                shape_errors.append(
                    f"{info.name!r} has shape {info.shape}, but {module}.{e.param} {e.shape} "
                    f"with rank {e.rank} needs {want}")
        base = found.pop(BASE_LAYER_KEY, None) if e.param == "embedding" else None
        if base is not None and base.shape != e.shape:
            shape_errors.append(f"{base.name!r} has shape {base.shape}, but "
                                f"{module}.embedding is {e.shape}")
        unexpected += [i.name for i in found.values()]
    for module, e in entries.items():
        if module not in by_module:
            missing += list(tensor_keys(module, e.param))
    if shape_errors:
        raise ShapeError(f"the adapter in {str(path)!r} does not fit this model: " +
                         "; ".join(shape_errors[:MAX_LISTED]) + ". Load it onto the base "
                         "model it was trained on, with its adapter_config.json.")
    if missing:
        problems.append(f"missing tensors: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listed(unexpected)}")
    if problems:
        raise HFError(f"the adapter in {str(path)!r} does not match its {CONFIG_FILE} "
                      f"(target_modules={d.get('target_modules')!r}): " + ". ".join(problems) +
                      ". Re-export it with PeftModel.save_pretrained or jlora.hf.save_peft.")

    # Base embeddings PEFT saved beside their adapter replace the base (as PEFT loads them).
    bases = {m: found[BASE_LAYER_KEY] for m, found in by_module.items()
             if BASE_LAYER_KEY in found}
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
        ka, kb = tensor_keys(module, e.param)
        for suffix, key in ((P.A_SUFFIX, ka), (P.B_SUFFIX, kb)):
            name = e.param + suffix
            out[name] = _replace(ls[name], read_tensor(index[key]).T, dtype)
        return out

    new_tree = P.map_modules(P.params_of(injected), fill)
    if tied_with is not None:  # the head's tensors must be the embedding's, transposed
        e = entries[tied_with]
        emb = module_leaves(new_tree)[tied_with]
        for key, mine in ((KERNEL_KEYS[0], e.param + P.B_SUFFIX),
                          (KERNEL_KEYS[1], e.param + P.A_SUFFIX)):
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


__all__ = ["load_peft"]
