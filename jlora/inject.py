"""plan() and inject(): which kernels get adapters, and adding A/B leaves beside them."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import (
    AlreadyInjectedError,
    ConfigError,
    KeyTypeError,
    LayoutError,
    ShapeError,
    TargetError,
)
from jlora.layout import Layout
from jlora.merge import weight_norm


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One kernel that would be adapted.

    Attributes:
      module: the module path (``model.layers.0.self_attn.q_proj``).
      param: the adapted leaf (``kernel`` or ``embedding``).
      shape: the kernel's shape; ``shape[:n_in]`` are input axes (A), the rest outputs (B).
      n_in: number of leading input axes.
      rank, alpha, scaling: the adapter's rank, alpha and scale.
      dtype: the adapters' dtype (fp32 for a half-precision base, as PEFT autocasts).
      dora: whether the adapter is DoRA's (with a magnitude of the output shape).

    Example:
      >>> e = PlanEntry("q", "kernel", (16, 3, 4), 1, 2, 4.0, 2.0, "float32")
      >>> e.a_shape, e.b_shape, e.n_params
      ((16, 2), (2, 3, 4), 56)
    """

    module: str
    param: str
    shape: tuple[int, ...]
    n_in: int
    rank: int
    alpha: float
    scaling: float
    dtype: Any
    dora: bool = False

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (*self.shape[: self.n_in], self.rank)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (self.rank, *self.shape[self.n_in:])

    @property
    def magnitude_shape(self) -> tuple[int, ...] | None:
        """DoRA's magnitude: one per output feature (None without DoRA)."""
        return self.shape[self.n_in:] if self.dora else None

    @property
    def n_params(self) -> int:
        m = math.prod(self.magnitude_shape) if self.dora else 0
        return math.prod(self.a_shape) + math.prod(self.b_shape) + m


@dataclasses.dataclass(frozen=True)
class Plan:
    """The dry run of :func:`inject`; ``str(plan)`` is a table.

    Example:
      >>> import numpy as np
      >>> from jlora import LoraConfig, plan
      >>> p = plan({"q": {"kernel": np.zeros((8, 8))}}, LoraConfig(rank=2, targets=["q"]))
      >>> print(p)  # doctest: +NORMALIZE_WHITESPACE
      path      shape  rank  alpha  scaling  params
      --------  -----  ----  -----  -------  ------
      q.kernel  8x8       2      8        4      32
      1 adapted kernels, 32 adapter params (33.3333% of 96)
    """

    entries: tuple[PlanEntry, ...]
    base_params: int
    copies: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(param path, shape)`` of each trainable copy (modules_to_save, bias modes)."""

    @property
    def adapter_params(self) -> int:
        return sum(e.n_params for e in self.entries) + sum(math.prod(s) for _, s in self.copies)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __str__(self) -> str:
        head = ("path", "shape", "rank", "alpha", "scaling", "params")
        rows = [(f"{e.module}.{e.param}", "x".join(map(str, e.shape)), str(e.rank),
                 f"{e.alpha:g}", f"{e.scaling:.4g}", f"{e.n_params:,}") for e in self.entries]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(  # noqa: E731
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
        if self.copies:
            n = sum(math.prod(s) for _, s in self.copies)
            lines.append(f"{len(self.copies)} trainable copies (modules_to_save, bias): "
                         f"{', '.join(p for p, _ in self.copies[:4])}"
                         f"{', ...' if len(self.copies) > 4 else ''} ({n:,} params)")
        total = self.base_params + self.adapter_params
        lines.append(f"{len(self.entries)} adapted kernels, {self.adapter_params:,} adapter "
                     f"params ({100 * self.adapter_params / max(total, 1):.4f}% of {total:,})")
        return "\n".join(lines)


def _module_table(params: Any) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """module path -> {leaf name: leaf}; and every module path (containers too)."""
    leaves: dict[str, dict[str, Any]] = {}
    modules: set[str] = set()
    for path, leaf in P.leaves_with_paths(params):
        module, name = P.split_path(path)
        leaves.setdefault(module, {})[name] = leaf
        parts = module.split(".") if module else []
        for i in range(1, len(parts) + 1):
            modules.add(".".join(parts[:i]))
    return leaves, modules


def _is_linear(module: str, leaf_names: dict[str, Any], layout: Layout | None) -> bool:
    if "kernel" not in leaf_names or module.rsplit(".", 1)[-1] in P.OUTPUT_HEAD_NAMES:
        return False
    if layout is not None and module in layout:
        return layout[module].kind in ("dense", "dense_general", "einsum")
    return np.ndim(P.unbox(leaf_names["kernel"])) == 2


def plan(params: Any, config: LoraConfig, *, layout: Layout | None = None,
         name: str = P.DEFAULT_ADAPTER) -> Plan:
    """The dry run of :func:`inject`: which paths would be adapted, shapes, ranks, counts.

    Raises the same errors as ``inject`` (nothing matched, a non-matrix target, a rank too
    large, a pattern that matches no target, a multi-axis kernel without a layout).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.zeros((16, 32))
      >>> params = {"attn": {"q": {"kernel": w}, "v": {"kernel": w}}}
      >>> p = plan(params, LoraConfig(rank=4, alpha=8, targets=["q"]))
      >>> [(e.module, e.a_shape, e.b_shape, e.scaling) for e in p]
      [('attn.q', (16, 4), (4, 32), 2.0)]
      >>> p.adapter_params
      192
    """
    return _plan(P.params_of(params), config, layout, name)[0]


def _plan(tree: Any, config: LoraConfig, layout: Layout | None, name: str
          ) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """:func:`plan` of a bare params tree, with the module table it read (for inject)."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a jlora.LoraConfig, got {type(config).__name__}; "
                          "build one with jlora.LoraConfig(rank=..., targets=[...]).")
    P.check_name(name, "inject")
    leaves, modules = _module_table(tree)
    names = P.adapter_names(tree)
    if name in names:
        raise AlreadyInjectedError(
            f"this tree already holds an adapter named {name!r} (its adapters: "
            f"{', '.join(map(repr, names))}): pass another name, e.g. inject(params, config, "
            f"key, name='second'), remove it with jlora.delete_adapter(params, {name!r}), or "
            "fold it in with jlora.merge(params, unload=True).")
    # the plan reads the model's own params; other adapters' leaves are not targets
    leaves = {m: {n: v for n, v in ls.items() if not P.is_adapter_name(n)}
              for m, ls in leaves.items()}
    targets = config.targets
    if targets == P.ALL_LINEAR:
        targets = tuple(sorted(m for m, ls in leaves.items() if _is_linear(m, ls, layout)))
        if not targets:
            raise TargetError("'all-linear' found no linear kernel (a 'kernel' leaf that is "
                              "not the output head) in this tree.")
    saved = _saved_modules(config, leaves, modules)
    rule = lambda m: not _inside_saved(m, config) and P.target_matches(  # noqa: E731
        m, targets, exclude=config.exclude, layers=config.layers,
        layers_pattern=config.layers_pattern)
    matched = sorted(m for m in modules | set(leaves) if rule(m))
    if not matched:
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        probe = targets if isinstance(targets, str) else targets[0]
        near = P.nearest(probe, [m for m in leaves if m])
        raise TargetError(
            f"targets {shown!r} match no module (exclude={config.exclude!r}, "
            f"layers={config.layers!r}, modules_to_save={config.modules_to_save!r}, which "
            f"are no targets). Nearest module paths: {', '.join(near)}. A list entry "
            "matches a path exactly or as a '.'-suffix; a string is a re.fullmatch regex.")

    entries = []
    for module in matched:
        ls = leaves.get(module, {})
        param = next((n for n in P.ADAPTABLE_PARAMS if n in ls), None)
        if param is None:
            if not ls:
                kids = sorted(m for m in leaves if m.startswith(module + ".") and
                              any(n in P.ADAPTABLE_PARAMS for n in leaves[m]))
                raise TargetError(
                    f"target matches {module!r}, a module that holds sub-modules, not a kernel. "
                    f"Name the layers inside it instead, e.g. {', '.join(kids[:4]) or 'none'}.")
            raise TargetError(
                f"target matches {module!r}, whose params ({', '.join(sorted(ls))}) hold no "
                "matrix: LoRA adapts a 'kernel' (Dense, DenseGeneral, Einsum, Conv) or an "
                "'embedding' (Embed). Exclude it or narrow the targets.")
        shape = tuple(np.shape(P.unbox(ls[param])))
        entries.append(_entry(config, module, param, shape, ls[param], layout))

    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name):
            if not any(re.match(rf"(.*\.)?({key})$", e.module) for e in entries):
                raise ConfigError(
                    f"{name} key {key!r} matches none of the {len(entries)} adapted modules "
                    f"(e.g. {entries[0].module}); a key matches a module path's end as a regex.")
    if config.init.startswith(("pissa", "olora")):
        emb = [e.module for e in entries if e.param == "embedding"]
        if emb:
            raise ConfigError(f"init={config.init!r} decomposes kernels, but {emb[0]!r} is an "
                              "embedding; exclude embeddings or use init='default'.")
        # QLoRA: a 4-bit kernel cannot hold the residual these inits write back
        quant = [e.module for e in entries if P.is_quantized(P.unbox(leaves[e.module][e.param]))]
        if quant:
            raise ConfigError(f"init={config.init!r} rewrites the kernel to a residual, but "
                              f"{quant[0]!r} is quantized (NF4); use init='default' or "
                              "'gaussian', or jlora.dequantize the params first.")
    copies = _copies(config, leaves, saved, {e.module for e in entries})
    base = sum(int(np.size(P.unbox(x))) for ls in leaves.values() for x in ls.values())
    shapes = tuple((f"{m}.{n}" if m else n, tuple(np.shape(P.unbox(leaves[m][n]))))
                   for m, n in copies)
    return Plan(tuple(entries), base, shapes), leaves


def _inside_saved(module: str, config: LoraConfig) -> bool:
    """PEFT never adapts a module in (or inside) one of ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.modules_to_save or ())


def _saved_modules(config: LoraConfig, leaves: dict[str, dict[str, Any]],
                   modules: set[str]) -> list[str]:
    """The modules ``modules_to_save`` copies: PEFT's rule, a module path ending with an entry
    (a plain string suffix)."""
    names = config.modules_to_save or ()
    found = sorted(m for m in modules | set(leaves) if m and any(m.endswith(t) for t in names))
    for name in names:
        if not any(m.endswith(name) for m in found):
            near = P.nearest(name, [m for m in leaves if m])
            raise TargetError(f"modules_to_save entry {name!r} matches no module (PEFT matches "
                              "an entry as the end of a module path). Nearest module paths: "
                              f"{', '.join(near)}.")
    for outer in found:
        inner = [m for m in found if m.startswith(outer + ".")]
        if inner:
            raise ConfigError(f"modules_to_save matches {outer!r} and {inner[0]!r} inside it: "
                              "the copy of the outer module holds the inner one; list only one.")
    return found


def _copies(config: LoraConfig, leaves: dict[str, dict[str, Any]], saved: list[str],
            adapted: set[str]) -> list[tuple[str, str]]:
    """``(module, param)`` of every trainable copy: each param of the ``modules_to_save``
    modules (and their sub-modules), then the biases the ``bias`` mode trains."""
    inside = lambda m, s: m == s or m.startswith(s + ".")  # noqa: E731
    out = [(m, n) for m in sorted(leaves) if any(inside(m, s) for s in saved)
           for n in sorted(leaves[m])]
    for m, n in out:
        if not jnp.issubdtype(getattr(P.unbox(leaves[m][n]), "dtype", float), jnp.floating):
            raise ConfigError(f"modules_to_save: {m}.{n} is not a floating-point param; a "
                              "trainable copy needs one.")
    if config.bias != "none":
        covered = set(out)
        out += [(m, "bias") for m in sorted(leaves) if "bias" in leaves[m]
                and (m, "bias") not in covered and (config.bias == "all" or m in adapted)]
    return out


def _entry(config, module, param, shape, leaf, layout) -> PlanEntry:
    where = f"{module}.{param}"
    if param == "embedding" or len(shape) == 2:
        if len(shape) != 2:
            raise TargetError(f"{where} has shape {shape}; an embedding must be (vocab, features).")
        n_in = 1
        info = layout.get(module) if layout is not None else None
        if info is not None and param == "kernel":
            if info.unsupported:
                raise LayoutError(f"{where}: LoRA cannot adapt this {info.kind}: "
                                  f"{info.unsupported}. Exclude it from the targets.")
            n_in = info.n_in
    elif len(shape) < 2:
        raise TargetError(f"target matches {module!r}, whose {param} has shape {shape}: not a "
                          "matrix. Exclude it or narrow the targets.")
    else:
        if layout is None or module not in layout:
            hint = ("pass layout=jlora.layout(model, *example_args) to inject/plan" if layout is
                    None else "the layout has no layer at this path: trace it with the same model")
            raise LayoutError(f"{where} has shape {shape}: a kernel with more than 2 axes "
                              f"(DenseGeneral, Einsum, Conv) is ambiguous; {hint}.")
        info = layout[module]
        if info.unsupported:
            raise LayoutError(f"{where}: LoRA cannot adapt this {info.kind}: "
                              f"{info.unsupported}. Exclude it from the targets.")
        n_in = info.n_in
    if config.use_dora and (param == "embedding" or (info is not None and info.kind == "conv")):
        raise LayoutError(f"{where}: DoRA adapts Dense, DenseGeneral and Einsum kernels only, "
                          f"not {'an Embed' if param == 'embedding' else 'a Conv'}; exclude it "
                          "from the targets or set use_dora=False.")
    rank, alpha = config.rank_for(module), config.alpha_for(module)
    n_fan_in, n_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if rank > min(n_fan_in, n_out):
        raise ShapeError(f"rank {rank} for {where} exceeds min(in={n_fan_in}, out={n_out}) of "
                         f"its {shape} kernel; lower rank (or set rank_pattern for this module).")
    dtype = jnp.dtype(getattr(P.unbox(leaf), "dtype", jnp.float32))
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        dtype = jnp.dtype(jnp.float32)
    return PlanEntry(module, param, shape, n_in, rank, alpha, config.scaling_for(rank, alpha),
                     dtype, config.use_dora)


def check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array | np.ndarray) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,) and key.ndim == 1))
    if not ok:
        raise KeyTypeError(f"key must be a JAX PRNG key, got {type(key).__name__} "
                           f"{getattr(key, 'dtype', '')}; pass jax.random.key(0).")


def _kaiming(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _init_ab(key, e: PlanEntry, init: str, kernel: jax.Array | None):
    ka, kb = jax.random.split(key)
    dt = e.dtype
    fan_in = math.prod(e.shape[: e.n_in])
    if e.param == "embedding":  # PEFT: A zero, B normal (random: both normal)
        a = (jax.random.normal(ka, e.a_shape, dt) if init == "random"
             else jnp.zeros(e.a_shape, dt))
        return a, jax.random.normal(kb, e.b_shape, dt), None
    if init in ("default", "random"):
        a = _kaiming(ka, e.a_shape, fan_in, dt)
        b = (_kaiming(kb, e.b_shape, e.rank, dt) if init == "random" else jnp.zeros(e.b_shape, dt))
        return a, b, None
    if init == "gaussian":
        return jax.random.normal(ka, e.a_shape, dt) / e.rank, jnp.zeros(e.b_shape, dt), None
    # pissa / olora: decompose the kernel as a (in, out) matrix, keep the residual
    r, s = e.rank, e.scaling
    w = jnp.asarray(kernel, jnp.float32).reshape(fan_in, -1)
    if init == "olora":  # PEFT: QR of W (out, in) -> A = R_r^T, B = Q_r^T
        q, rr = jnp.linalg.qr(w.T)
        a, b = rr[:r].T, q[:, :r].T
    else:
        if init == "pissa":
            u, sv, vh = jnp.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, vh = _svd_lowrank(ka, w, r, int(init.rsplit("_", 1)[-1]))
        root = jnp.sqrt(sv / s)
        a, b = u * root[None, :], root[:, None] * vh
    residual = (w - s * (a @ b)).reshape(e.shape).astype(kernel.dtype)
    return a.reshape(e.a_shape).astype(dt), b.reshape(e.b_shape).astype(dt), residual


def _svd_lowrank(key, w, r, niter):
    """Randomised SVD (Halko et al.), as torch.svd_lowrank used by PEFT's pissa_niter_N."""
    q = min(r + 2, min(w.shape))
    y = w @ jax.random.normal(key, (w.shape[1], q), w.dtype)
    qm, _ = jnp.linalg.qr(y)
    for _ in range(niter):
        qm, _ = jnp.linalg.qr(w.T @ qm)
        qm, _ = jnp.linalg.qr(w @ qm)
    u, sv, vh = jnp.linalg.svd(qm.T @ w, full_matrices=False)
    return (qm @ u)[:, :r], sv[:r], vh[:r]


def _like(kernel_leaf: Any, value: jax.Array, axes: Sequence[int | None] | None) -> Any:
    """Gives ``value`` the kernel's box and sharding, with axes picked from the kernel's.

    ``axes`` lists, for each dim of value, the kernel dim whose sharding it takes (None: the
    rank axis, replicated).
    """
    if P.is_box(kernel_leaf) and isinstance(kernel_leaf, meta.Partitioned):
        names = tuple(kernel_leaf.names) + (None,) * 8
        new = tuple(None if i is None else names[i] for i in axes)
        return kernel_leaf.replace_boxed(value).replace(names=new)
    if P.is_box(kernel_leaf):
        return kernel_leaf.replace_boxed(value)
    sharding = getattr(kernel_leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(kernel_leaf,
                                                                          jax.core.Tracer):
        spec = tuple(sharding.spec) + (None,) * 8
        new = jax.sharding.PartitionSpec(*(None if i is None else spec[i] for i in axes))
        return jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, new))
    return value


def inject(params: Any, config: LoraConfig, key: jax.Array, *, layout: Layout | None = None,
           name: str = P.DEFAULT_ADAPTER):
    """Adds ``<param>_lora_a`` (in..., r), ``<param>_lora_b`` (r, out...) and the scale
    ``<param>_lora_scale`` beside every kernel the config targets; with ``use_dora``, DoRA's
    magnitude ``<param>_lora_magnitude`` (out...), the norm of ``W + scale * A @ B`` per output
    feature as PEFT starts it; and ``<param>_lora_saved``, a trainable copy, beside each param
    of ``modules_to_save`` and each bias the ``bias`` mode trains.

    B starts at zero (A at zero for embeddings, as PEFT), so the model is unchanged at init
    (except ``init='pissa'/'olora'``, which rewrite the kernel to its residual so that the
    adapted model still equals the base, and ``init='random'``). A and B keep the kernel's
    box and sharding: A takes its input axes, B its output axes.

    Args:
      params: what ``model.init`` returns, or a bare params tree.
      config: the :class:`LoraConfig`.
      key: a JAX PRNG key (``jax.random.key(0)``).
      layout: ``jlora.layout(model, *example_args)``, needed for kernels with more than two
        axes (DenseGeneral, Einsum, Conv).
      name: the adapter's name (PEFT's ``adapter_name``). ``'default'`` uses the leaf names
        above; another name adds a separate adapter beside those already in the tree, its
        leaves suffixed ``@<name>`` (``kernel_lora_a@math``). Select adapters with
        ``jlora.lora(fn, adapter=...)``, train one with ``jlora.optimizer(tx, params,
        adapter=...)``.

    Returns:
      A new tree of the same kind with the adapter leaves added.

    Raises:
      AlreadyInjectedError: the tree already holds an adapter of this name.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"params": {"q": {"kernel": jnp.ones((4, 6))}}}
      >>> out = inject(params, LoraConfig(rank=2, targets=["q"]), jax.random.key(0))
      >>> sorted(out["params"]["q"]), out["params"]["q"]["kernel_lora_a"].shape
      (['kernel', 'kernel_lora_a', 'kernel_lora_b', 'kernel_lora_scale'], (4, 2))
    """
    check_key(key)
    tree = P.params_of(params)
    p, leaves = _plan(tree, config, layout, name)
    n = functools.partial(P.named, name=name)
    keys = jax.random.split(key, len(p.entries))
    additions: dict[str, dict[str, Any]] = {}
    for k, e in zip(keys, p.entries):
        leaf = leaves[e.module][e.param]
        kernel = P.unbox(leaf)
        a, b, residual = _init_ab(k, e, config.init, kernel)
        rank_axis = [None]
        new = {
            n(e.param + P.A_SUFFIX): _like(leaf, a, [*range(e.n_in), *rank_axis]),
            n(e.param + P.B_SUFFIX): _like(leaf, b, [*rank_axis, *range(e.n_in, len(e.shape))]),
            n(e.param + P.SCALE_SUFFIX): _like(leaf, jnp.asarray(e.scaling, jnp.float32), []),
        }
        if residual is not None:
            new[e.param] = _like(leaf, residual, list(range(len(e.shape))))
        if e.dora:  # PEFT: the norm of W + scale * A @ B per output feature, at init
            w = kernel if residual is None else residual
            m = weight_norm(w, a, b, e.scaling).astype(e.dtype)
            new[n(e.param + P.MAGNITUDE_SUFFIX)] = _like(leaf, m, list(range(e.n_in, len(e.shape))))
        additions[e.module] = new
    for path, _ in p.copies:
        module, param = P.split_path(path)
        leaf = leaves[module][param]
        axes = list(range(np.ndim(P.unbox(leaf))))
        copy = jnp.array(P.unbox(leaf), copy=True)  # its own buffer: training may donate it
        additions.setdefault(module, {})[n(param + P.SAVED_SUFFIX)] = _like(leaf, copy, axes)
    done: set[str] = set()

    def add(module, ls):
        new = additions.get(module)
        if new is None:
            return ls
        done.add(module)
        return {**ls, **new}

    out = P.map_modules(tree, add)
    if done != set(additions):
        raise ConfigError(f"cannot add adapters to {sorted(set(additions) - done)[0]!r}: jlora "
                          "expects params as nested dicts (mappings), as linen makes them.")
    return P.with_params(params, out)
