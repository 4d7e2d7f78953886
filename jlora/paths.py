"""Paths and target rules.

One path representation: a leaf's JAX keypath joined with ``.``, without the collection name
(``model.layers.0.self_attn.q_proj.kernel``); the *module path* drops the param name
(``model.layers.0.self_attn.q_proj``). Target rules are PEFT's, to the letter
(``peft.tuners.tuners_utils.check_target_module_exists`` and ``peft.utils.other.get_pattern_key``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax.core import meta

# Leaf-name suffixes of adapter state, beside the adapted param ``<param>``.
A_SUFFIX = "_lora_a"
B_SUFFIX = "_lora_b"
SCALE_SUFFIX = "_lora_scale"
MERGED_SUFFIX = "_lora_merged"  # replaces SCALE_SUFFIX once the adapter is folded in
# DoRA: the per-output-feature magnitude (PEFT's lora_magnitude_vector), and, once merged,
# the weight norm the merge divided by (so that unmerge can take it back out).
MAGNITUDE_SUFFIX = "_lora_magnitude"
NORM_SUFFIX = "_lora_norm"
# A trainable copy of a param (PEFT's modules_to_save, and biases with bias='all'/'lora_only'):
# the model reads the copy; merged, the param holds the copy and the original is kept aside.
SAVED_SUFFIX = "_lora_saved"
ORIGINAL_SUFFIX = "_lora_original"  # replaces SAVED_SUFFIX once the copy is folded in
LORA_MARK = "_lora_"
# Named adapters: the adapter "default" uses the names above; another adapter ``name`` appends
# ``@name`` to each of its leaves (``kernel_lora_a@math``), so a leaf parses back to
# (param, adapter name, role) without ambiguity.
NAME_SEP = "@"
DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
TRAINABLE_SUFFIXES = (A_SUFFIX, B_SUFFIX, MAGNITUDE_SUFFIX, SAVED_SUFFIX)

# Params that LoRA can adapt: linen's Dense/DenseGeneral/Einsum/Conv ``kernel`` and Embed's
# ``embedding``.
ADAPTABLE_PARAMS = ("kernel", "embedding")
# Output heads that "all-linear" leaves out (PEFT drops the model's output embeddings).
OUTPUT_HEAD_NAMES = ("lm_head",)
ALL_LINEAR = "all-linear"


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def keypath_to_path(keypath: Sequence[Any]) -> str:
    """Joins a JAX keypath into a dotted path.

    Example:
      >>> import jax
      >>> [(kp, _)] = jax.tree_util.tree_flatten_with_path({"a": {"b": [0]}})[0]
      >>> keypath_to_path(kp)
      'a.b.0'
    """
    return ".".join(_key_str(k) for k in keypath)


def is_nnx_state(tree: Any) -> bool:
    """An ``flax.nnx.State`` (checked by name: no nnx import for linen users)."""
    return any(c.__name__ == "State" and c.__module__.startswith("flax.nnx")
               for c in type(tree).__mro__)


def is_variables(tree: Any) -> bool:
    """True for what ``model.init`` returns (a dict holding a ``'params'`` collection)."""
    return (isinstance(tree, Mapping) and not is_nnx_state(tree) and "params" in tree
            and isinstance(tree["params"], Mapping))


def params_of(tree: Any) -> Any:
    """The params collection of a variables dict, or the tree itself when it is bare."""
    if is_nnx_state(tree):  # Flax NNX: the State's nnx.Param values (jlora/nnx_tree.py)
        from jlora import nnx_tree

        return nnx_tree.params_of(tree)
    return tree["params"] if is_variables(tree) else tree


def with_params(tree: Any, params: Any) -> Any:
    """Puts ``params`` back where :func:`params_of` took it from (same kind of tree)."""
    if is_nnx_state(tree):  # Flax NNX: back into the State's Variables (jlora/nnx_tree.py)
        from jlora import nnx_tree

        return nnx_tree.with_params(tree, params)
    if is_variables(tree):
        out = dict(tree)
        out["params"] = params
        return type(tree)(out) if not isinstance(tree, dict) else out
    return params


def is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(x: Any) -> Any:
    return x.unbox() if is_box(x) else x


def is_quantized(x: Any) -> bool:
    """A quantized param (jlora.quant's NF4 node): a frozen leaf to every tree walker."""
    return getattr(type(x), "jlora_quantized", False)


def is_leaf(x: Any) -> bool:
    """A box or a quantized param: what tree walkers keep whole."""
    return is_box(x) or is_quantized(x)


def leaves_with_paths(params: Any) -> list[tuple[str, Any]]:
    """``(dotted path, leaf)`` for every leaf of a bare params tree (boxes and quantized
    params kept whole)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    return [(keypath_to_path(kp), leaf) for kp, leaf in flat]


def split_path(path: str) -> tuple[str, str]:
    """``'a.b.kernel'`` -> ``('a.b', 'kernel')``."""
    module, _, name = path.rpartition(".")
    return module, name


def is_adapter_name(name: str) -> bool:
    """True for a leaf name that holds adapter state (``kernel_lora_a``, ...)."""
    return LORA_MARK in name


def is_trainable_name(name: str) -> bool:
    """True for the leaves LoRA trains (A and B, DoRA's magnitude, trainable copies), of any
    adapter name."""
    return is_adapter_name(name) and parse_leaf(name)[0].endswith(TRAINABLE_SUFFIXES)


# --------------------------------------------------------------------------- adapter names


def check_name(name: Any, what: str) -> str:
    """``name`` if it is a valid adapter name, else :class:`~jlora.errors.ConfigError`.

    Example:
      >>> check_name("math", "inject")
      'math'
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        from jlora.errors import ConfigError

        raise ConfigError(f"{what}: adapter name {name!r} must be a non-empty string of "
                          "letters, digits, '_' and '-' (it names leaves and PEFT subfolders), "
                          "e.g. 'default' or 'math'.")
    return name


def named(stem: str, name: str) -> str:
    """The leaf name of role ``stem`` (``'kernel_lora_a'``) for adapter ``name``.

    Example:
      >>> named("kernel_lora_a", "default"), named("kernel_lora_a", "math")
      ('kernel_lora_a', 'kernel_lora_a@math')
    """
    return stem if name == DEFAULT_ADAPTER else f"{stem}{NAME_SEP}{name}"


def parse_leaf(leaf: str) -> tuple[str, str]:
    """``(stem, adapter name)`` of an adapter leaf name: the inverse of :func:`named`.

    Example:
      >>> parse_leaf("kernel_lora_b@math"), parse_leaf("kernel_lora_b")
      (('kernel_lora_b', 'math'), ('kernel_lora_b', 'default'))
    """
    stem, sep, name = leaf.partition(NAME_SEP)
    return stem, (name if sep else DEFAULT_ADAPTER)


def views(leaves: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One module's leaves seen by each adapter: ``{name: leaves}``, where each holds the
    module's own params plus that adapter's leaves under their default names.

    Example:
      >>> v = views({"kernel": 0, "kernel_lora_a": 1, "kernel_lora_a@math": 2})
      >>> v["math"]
      {'kernel': 0, 'kernel_lora_a': 2}
    """
    own = {k: v for k, v in leaves.items() if not is_adapter_name(k)}
    out: dict[str, dict[str, Any]] = {}
    for k, v in leaves.items():
        if is_adapter_name(k):
            stem, name = parse_leaf(k)
            out.setdefault(name, dict(own))[stem] = v
    return dict(sorted(out.items(), key=lambda kv: adapter_names_order(kv[0])))


def unview(leaves: Mapping[str, Any], name: str, view: Mapping[str, Any]) -> dict[str, Any]:
    """Writes a (changed) view of adapter ``name`` back into a module's leaves: its adapter
    leaves are replaced by the view's, and the module's params take the view's values."""
    out = {k: v for k, v in leaves.items()
           if not (is_adapter_name(k) and parse_leaf(k)[1] == name)}
    for k, v in view.items():
        out[named(k, name) if is_adapter_name(k) else k] = v
    return out


def require_names(tree: Any, adapter: str | Sequence[str] | None, what: str
                  ) -> tuple[str, ...] | None:
    """The adapter names ``adapter`` selects (None: all), each checked to be in the tree;
    :class:`~jlora.errors.AdapterNameError` lists the tree's names otherwise."""
    if adapter is None:
        return None
    wanted = (adapter,) if isinstance(adapter, str) else tuple(adapter)
    have = adapter_names(tree)
    for name in wanted:
        if not isinstance(name, str) or name not in have:
            from jlora.errors import AdapterNameError

            raise AdapterNameError(f"{what}: no adapter named {name!r} in this tree; its "
                                   f"adapters are {', '.join(map(repr, have)) or 'none'}.")
    return wanted


def adapter_names_order(name: str) -> tuple[bool, str]:
    """The sort key of adapter names: ``'default'`` first, then the others by name."""
    return (name != DEFAULT_ADAPTER, name)


def adapter_names(tree: Any) -> tuple[str, ...]:
    """The names of the adapters in a tree: ``'default'`` first, then the others sorted.

    This order is what a mixed batch's indices refer to (``jlora.lora(fn, adapter=ids)``).

    Example:
      >>> adapter_names({"q": {"kernel": 0, "kernel_lora_a@math": 1, "kernel_lora_a": 2}})
      ('default', 'math')
    """
    names = {parse_leaf(path.rsplit(".", 1)[-1])[1]
             for path, _ in leaves_with_paths(params_of(tree))
             if is_adapter_name(path.rsplit(".", 1)[-1])}
    return tuple(sorted(names, key=adapter_names_order))


class Adapter(NamedTuple):
    """What :func:`check_adapters` found beside one param, for one adapter name.

    Attributes:
      kind: ``'lora'`` (A, B, scale), ``'dora'`` (plus a magnitude) or ``'copy'`` (a trainable
        copy of the param: modules_to_save or a bias mode).
      merged: whether it is folded into the param (``merge``).
    """

    kind: str
    merged: bool


def require_adapters(tree: Any, what: str) -> dict[tuple[str, str], Adapter]:
    """:func:`check_adapters`, and :class:`~jlora.errors.NotInjectedError` if there are none."""
    found = check_adapters(tree, what)
    if not found:
        from jlora.errors import NotInjectedError

        raise NotInjectedError(f"{what}: this tree holds no LoRA adapters; call "
                               "jlora.inject(params, config, key) first.")
    return found


_LORA_ROLES = (A_SUFFIX, B_SUFFIX, SCALE_SUFFIX, MERGED_SUFFIX, MAGNITUDE_SUFFIX, NORM_SUFFIX)
_COPY_ROLES = (SAVED_SUFFIX, ORIGINAL_SUFFIX)
_ROLES = _LORA_ROLES + _COPY_ROLES
_MAX_LISTED = 5


def _shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(unbox(x), "shape", None)
    return None if shape is None else tuple(shape)


def _unfit(param: str, leaves: Mapping[str, Any]) -> str | None:
    """Why the adapter of ``param`` does not fit its param, or None (holes are not checked)."""
    shape = lambda role: _shape(leaves.get(param + role))  # noqa: E731
    a, b, w = shape(A_SUFFIX), shape(B_SUFFIX), _shape(leaves.get(param))
    s = shape(SCALE_SUFFIX) if param + SCALE_SUFFIX in leaves else shape(MERGED_SUFFIX)
    for role in _COPY_ROLES:
        c = shape(role)
        if c is not None and w is not None and c != w:
            return f"{param}{role} has shape {c}, not {param}'s shape {w}"
    if a is not None and len(a) < 2:
        return f"{param}{A_SUFFIX} has shape {a}, not (in..., r)"
    if b is not None and len(b) < 2:
        return f"{param}{B_SUFFIX} has shape {b}, not (r, out...)"
    if a is not None and b is not None:
        if a[-1] != b[0]:
            return (f"{param}{A_SUFFIX} {a} has rank {a[-1]} but {param}{B_SUFFIX} {b} has "
                    f"rank {b[0]}")
        if w is not None and a[:-1] + b[1:] != w:
            return (f"{param}{A_SUFFIX} {a} @ {param}{B_SUFFIX} {b} gives {a[:-1] + b[1:]}, "
                    f"not {param}'s shape {w}")
    out = b[1:] if b is not None else None
    for role in (MAGNITUDE_SUFFIX, NORM_SUFFIX):
        m = shape(role)
        if m is not None and out is not None and m != out:
            return f"{param}{role} has shape {m}, not B's output shape {out}"
    if s:
        return f"its scale has shape {s}, not ()"
    return None


def _whole(param: str, leaves: Mapping[str, Any]) -> tuple[str | None, Adapter]:
    """``(why it is not whole or None, what it is)`` for the adapter of one param."""
    have = [param + r for r in _ROLES if param + r in leaves]
    both = lambda x, y: f"it has both {param}{x} and {param}{y}"  # noqa: E731
    lora = [r for r in _LORA_ROLES if param + r in leaves]
    copy = [r for r in _COPY_ROLES if param + r in leaves]
    no_param = [] if param in leaves else [f"the param {param!r} it adapts"]
    if lora and copy:
        return (f"it mixes a LoRA adapter ({', '.join(param + r for r in lora)}) with a "
                f"trainable copy ({', '.join(param + r for r in copy)})"), Adapter("copy", False)
    if copy:
        if len(copy) > 1:
            return both(SAVED_SUFFIX, ORIGINAL_SUFFIX), Adapter("copy", False)
        need = no_param
        adapter = Adapter("copy", copy[0] == ORIGINAL_SUFFIX)
    else:
        need = [param + r for r in (A_SUFFIX, B_SUFFIX) if param + r not in leaves]
        states = [r for r in (SCALE_SUFFIX, MERGED_SUFFIX) if param + r in leaves]
        if not states:
            need.append(f"{param}{SCALE_SUFFIX} (or {param}{MERGED_SUFFIX})")
        need += no_param
        dora = param + MAGNITUDE_SUFFIX in leaves
        merged = states == [MERGED_SUFFIX]
        if dora and merged and param + NORM_SUFFIX not in leaves:
            need.append(f"{param}{NORM_SUFFIX} (a merged DoRA adapter keeps the weight norm "
                        "it divided by)")
        adapter = Adapter("dora" if dora else "lora", merged)
        if not need and len(states) > 1:
            return both(SCALE_SUFFIX, MERGED_SUFFIX), adapter
        if not need and param + NORM_SUFFIX in leaves and not (dora and merged):
            return (f"it has {param}{NORM_SUFFIX}, which only a merged DoRA adapter has "
                    f"(beside {param}{MAGNITUDE_SUFFIX} and {param}{MERGED_SUFFIX})"), adapter
    if need:
        return f"it has {', '.join(have)} but no {' and no '.join(need)}", adapter
    return None, adapter


def check_adapters(tree: Any, what: str) -> dict[tuple[str, str], Adapter]:
    """Checks that every adapter of a bare params tree is whole and fits the param it adapts.

    An adapter is ``<param>_lora_a`` (in..., r), ``<param>_lora_b`` (r, out...) and exactly
    one of ``<param>_lora_scale`` / ``<param>_lora_merged`` (0-d), beside ``<param>``; a DoRA
    adapter adds ``<param>_lora_magnitude`` (out...) and, merged, ``<param>_lora_norm``
    (out...). A trainable copy (modules_to_save, bias modes) is exactly one of
    ``<param>_lora_saved`` / ``<param>_lora_original``, shaped as ``<param>``. A ``None``
    leaf (a hole left by :func:`jlora.split`) counts as present and is not shape-checked.
    Plain Python over the tree's paths: under ``jit`` it runs once per trace.

    Args:
      tree: a bare params tree (not a variables dict).
      what: the caller's name, for the message.

    Returns:
      ``{(module path, param, adapter name): Adapter(kind, merged)}`` for every adapter
      (empty when there are none). Leaves of a named adapter end in ``@<name>``; each name
      is checked on its own.

    Raises:
      IncompleteAdapterError: an adapter misses a leaf, or its param is missing.
      ShapeError: A and B do not fit each other or the param.

    Example:
      >>> import jax.numpy as jnp
      >>> q = {"kernel": jnp.ones((4, 6)), "kernel_lora_a": jnp.ones((4, 2)),
      ...      "kernel_lora_b": jnp.zeros((2, 6)), "kernel_lora_scale": jnp.float32(1)}
      >>> check_adapters({"q": q}, "demo")
      {('q', 'kernel', 'default'): Adapter(kind='lora', merged=False)}
      >>> del q["kernel_lora_b"]
      >>> check_adapters({"q": q}, "demo")
      Traceback (most recent call last):
      ...
      jlora.errors.IncompleteAdapterError: demo: the adapter of q.kernel is not whole: ...
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or is_leaf(x))
    modules: dict[str, dict[str, Any]] = {}
    for kp, leaf in flat:
        module, name = split_path(keypath_to_path(kp))
        modules.setdefault(module, {})[name] = leaf
    found: dict[tuple[str, str], Adapter] = {}
    broken: list[str] = []
    unfit: list[str] = []
    for module, all_leaves in modules.items():
        for name, leaves in views(all_leaves).items():
            params = {leaf[: -len(r)] for leaf in leaves for r in _ROLES
                      if leaf.endswith(r) and len(leaf) > len(r)}
            bad = [k for k in all_leaves if is_adapter_name(k) and parse_leaf(k)[1] == name
                   and not any(parse_leaf(k)[0] == p + r for p in params for r in _ROLES)]
            if bad:
                where = f"{module}." if module else ""
                broken.append(f"{where}{bad[0]} is not a leaf jlora knows (an adapter leaf is "
                              f"<param><role>{NAME_SEP}<name>, roles {', '.join(_ROLES)})")
            for param in sorted(params):
                where = f"{module}.{param}" if module else param
                if name != DEFAULT_ADAPTER:
                    where += f" (adapter {name!r})"
                why_not, adapter = _whole(param, leaves)
                if why_not is not None:
                    broken.append(f"the adapter of {where} is not whole: {why_not}")
                elif (why := _unfit(param, leaves)) is not None:
                    unfit.append(f"the adapter of {where} does not fit: {why}")
                else:
                    found[(module, param, name)] = adapter
    if broken or unfit:
        from jlora.errors import IncompleteAdapterError, ShapeError

        listed = broken or unfit
        more = f" (and {len(listed) - _MAX_LISTED} more)" if len(listed) > _MAX_LISTED else ""
        fix = ("Every adapter is <param>_lora_a (in..., r), <param>_lora_b (r, out...) and "
               "<param>_lora_scale (<param>_lora_merged once merged) beside <param> (DoRA adds "
               "<param>_lora_magnitude); a trainable copy is <param>_lora_saved "
               "(<param>_lora_original once merged): build it with jlora.inject (or "
               "jlora.hf.load_peft), or remove all of its leaves.")
        cls = IncompleteAdapterError if broken else ShapeError
        raise cls(f"{what}: {'; '.join(listed[:_MAX_LISTED])}{more}. {fix}")
    return found


def base_name(name: str) -> str:
    """``'kernel_lora_a'`` -> ``'kernel'``."""
    return name.split(LORA_MARK, 1)[0]


# --------------------------------------------------------------------------- target rules


def _as_tuple(x: str | Iterable[str] | None) -> tuple[str, ...] | str | None:
    if x is None or isinstance(x, str):
        return x
    return tuple(x)


def target_matches(
    path: str,
    targets: str | Sequence[str],
    *,
    exclude: str | Sequence[str] | None = None,
    layers: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Whether a module path is a LoRA target, with PEFT's exact semantics.

    * ``exclude`` wins: a string is ``re.fullmatch``; a list matches an entry exactly or as
      a ``.``-suffix.
    * ``targets`` as a string is ``re.fullmatch`` on the path; as a list, an entry matches
      exactly or as a ``.``-suffix.
    * ``layers`` (PEFT's ``layers_to_transform``) then keeps only modules whose first numbered
      path segment (after ``layers_pattern`` when given) is in ``layers``. As in PEFT it
      applies to suffix matches of a list only, not to regex or exact matches.

    Example:
      >>> target_matches("model.layers.0.self_attn.q_proj", ["q_proj", "v_proj"])
      True
      >>> target_matches("model.layers.0.self_attn.q_proj", ["q_proj"], layers=[1])
      False
      >>> target_matches("model.layers.0.self_attn.q_proj", r".*\\.(q|v)_proj")
      True
    """
    exclude = _as_tuple(exclude)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                return False
        elif path in exclude or any(path.endswith(f".{e}") for e in exclude):
            return False

    targets = _as_tuple(targets)
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    found = any(path.endswith(f".{t}") for t in targets)
    if isinstance(layers, list | tuple):
        using_layers = len(layers) != 0
    else:
        using_layers = layers is not None
    if not (using_layers and found):
        return found
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def pattern_key(pattern_keys: Iterable[str], path: str) -> str | None:
    """The first rank/alpha pattern key that matches a module path (PEFT's get_pattern_key).

    A key matches when the path ends with it as a regex after an optional ``<anything>.``.

    Example:
      >>> pattern_key(["v_proj", r"layers\\.1\\..*"], "model.layers.1.self_attn.q_proj")
      'layers\\\\.1\\\\..*'
      >>> pattern_key(["v_proj"], "model.layers.1.self_attn.q_proj") is None
      True
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def nearest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Candidates closest to ``name`` (by last segment first, then whole path)."""
    candidates = sorted(set(candidates))
    last = {c.rsplit(".", 1)[-1]: c for c in candidates}
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(last), n=n, cutoff=0.4)
    out = [last[c] for c in close]
    for c in difflib.get_close_matches(name, candidates, n=n, cutoff=0.3):
        if c not in out:
            out.append(c)
    return out[:n] or candidates[:n]


def map_modules(tree: Any, fn: Any, _prefix: str = "") -> Any:
    """Rebuilds a nested-mapping params tree module by module.

    ``fn(module_path, leaves) -> leaves`` gets each module's direct leaves (a dict of name ->
    leaf, boxes kept whole) and returns the new ones; sub-modules are rebuilt recursively.
    The container types of the tree are kept.
    """
    if not isinstance(tree, Mapping):
        return tree
    subs = {k: v for k, v in tree.items() if isinstance(v, Mapping)}
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    out = {}
    for k, v in subs.items():
        out[k] = map_modules(v, fn, f"{_prefix}.{k}" if _prefix else str(k))
    out.update(fn(_prefix, leaves) if leaves else leaves)
    return out if isinstance(tree, dict) else type(tree)(out)


def adapter_params(leaves: Mapping[str, Any]) -> list[str]:
    """Names of the adapted params among one module's leaves (``['kernel']``)."""
    return sorted(n[: -len(A_SUFFIX)] for n in leaves if n.endswith(A_SUFFIX))
