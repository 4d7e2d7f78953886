"""The checks behind :class:`jlora.checkpoint.Checkpointer`: its arguments, a step's JSON
record, and what differs between a saved step and this run (config, adapters, the state's
tree as orbax stores it)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import numpy as np

from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import ConfigError

FORMAT = "jlora-train-1"
MAX_LISTED = 5
_MAX_REASON = 300


def why(e: BaseException) -> str:
    """One line on an exception from orbax, tensorstore or json (their messages can be huge)."""
    text = " ".join(str(e).split())
    text = text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."
    return f"{type(e).__name__}: {text}"


def count(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``: a Python or NumPy int or a 0-d integer array (e.g.
    ``state.step``); never a bool, a float or a string."""
    ok = not isinstance(value, bool | np.bool_) and (
        isinstance(value, numbers.Integral)
        or (hasattr(value, "dtype") and np.ndim(value) == 0
            and np.issubdtype(value.dtype, np.integer)))
    if not ok or int(value) < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{name}={value!r} must be {kind}.")
    return int(value)


def listed(items: list[str], n: int = MAX_LISTED) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def adapter_shapes(state: Any) -> dict[str, list[int]]:
    """``{dotted path: shape}`` of the adapters in a TrainState (or a trainable tree)."""
    params = getattr(state, "params", state)
    return {p: list(np.shape(x)) for p, x in P.leaves_with_paths(params) if x is not None}


def config_diff(saved: LoraConfig, mine: LoraConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(LoraConfig):
        a, b = getattr(saved, f.name), getattr(mine, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r} vs this run {b!r}")
    return out


def _only(tree: dict[str, Any], other: dict[str, Any], name: str,
          other_name: str) -> list[tuple[str, str]]:
    """``(path, what)`` for the paths of ``tree`` missing from ``other``; a subtree missing as
    a whole is named once."""
    prefixes = {".".join(q.split(".")[:k]) for q in other for k in range(1, q.count(".") + 2)}
    groups: dict[str, list[str]] = {}
    for p in sorted(set(tree) - set(other)):
        parts = p.split(".")
        top = next((".".join(parts[:k]) for k in range(1, len(parts) + 1)
                    if ".".join(parts[:k]) not in prefixes), p)
        groups.setdefault(top, []).append(p)
    out = []
    for top, paths in groups.items():
        if top in prefixes:  # a leaf or an empty node here, a subtree there
            kind = "empty" if tree[top] is None else "an array"
            out.append((top, f"{top}: {kind} in {name}, a subtree in {other_name}"))
        elif paths == [top]:
            out.append((top, f"{top}{' (empty)' if tree[top] is None else ''}: only in {name}"))
        else:
            n = sum(tree[p] is not None for p in paths)
            out.append((top, f"{top}.* ({n} arrays): only in {name}"))
    return out


def tree_diff(saved: dict[str, Any], mine: dict[str, Any], here: str) -> list[str]:
    """What differs between two ``{path: shape or None}`` trees, in path order."""
    desc = lambda shape: "nothing" if shape is None else str(tuple(shape))  # noqa: E731
    out = _only(saved, mine, "the checkpoint", here)
    out += _only(mine, saved, here, "the checkpoint")
    out += [(p, f"{p}: shape {desc(saved[p])} in the checkpoint vs {desc(mine[p])} here")
            for p in set(saved) & set(mine) if saved[p] != mine[p]]
    return [what for _, what in sorted(out)]


def _is_empty(x: Any) -> bool:
    return x is None or (isinstance(x, tuple | list | dict) and len(x) == 0)


def skeleton(tree: Any) -> dict[str, list[int] | None]:
    """``{dotted path: shape}`` of every leaf and ``{path: None}`` of every empty node (None,
    optax's EmptyState...), as orbax names and stores them: two trees with equal skeletons
    restore onto each other."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)
    return {P.keypath_to_path(kp): None if _is_empty(x) else list(np.shape(x))
            for kp, x in flat}


_META_FIELDS = {"format": str, "step": int, "data_position": int, "lora_config": dict,
                "adapters": dict}


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a step's JSON record, or None."""
    if not isinstance(meta, dict):
        return f"its metadata is a {type(meta).__name__}, not a JSON object"
    if meta.get("format") != FORMAT:
        return (f"its metadata has format {meta.get('format')!r}, not {FORMAT!r} (not a jlora "
                "training checkpoint, or damaged)")
    for key, kind in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"its metadata field {key!r} is {meta.get(key)!r}, not a {kind.__name__}"
    if not isinstance(meta.get("model_id"), str | None):
        return f"its metadata field 'model_id' is {meta['model_id']!r}, not a string or null"
    return None
