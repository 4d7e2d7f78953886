"""add_weighted_adapter: a new adapter from a weighted combination of others, with PEFT's
combination types, math and rank rules (``peft.tuners.lora.LoraModel.add_weighted_adapter``
and ``peft.utils.merge_utils`` of peft 0.21).

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A's and
  the B's separately, each weighted by ``sqrt(|w * scale|)`` (the sign on A only): the
  adapters need equal ranks and the same adapted params.
* ``cat`` stacks the adapters along the rank (A weighted by ``w * scale``): rank = the sum of
  the ranks; exact.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
  combine the full ``ΔW`` of each adapter, then keep the top ``svd_rank`` singular directions
  (default: the largest rank); mixed ranks are fine.

The new adapter has ``lora_alpha`` = its rank, so its scale is 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as P
from jlora.errors import AlreadyInjectedError, ConfigError, KeyTypeError

ELEMENTWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
TYPES = ELEMENTWISE + ("cat",) + SVD
_PRUNED = ("ties", "dare", "magnitude_prune")  # prefixes of the types that take a density


# ----------------------------------------------------------------------------- merge_utils


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * size)`` largest magnitudes (PEFT's magnitude_based_pruning)."""
    k = int(density * x.size)
    flat = jnp.abs(x).reshape(-1)
    keep = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(flat, k)[1]].set(True) if k else \
        jnp.zeros(flat.shape, bool)
    return jnp.where(keep.reshape(x.shape), x, 0)


def _random_prune(x: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keeps each value with probability ``density`` and rescales it by ``1/density``."""
    keep = jax.random.bernoulli(key, density, x.shape)
    return jnp.where(keep, x / density, 0)


def _prune(x: jax.Array, density: float, method: str, key: jax.Array | None) -> jax.Array:
    if density >= 1:  # PEFT: no pruning (it warns)
        return x
    return _magnitude_prune(x, density) if method == "magnitude" else _random_prune(
        x, density, key)


def _disjoint(stacked: jax.Array, weights: jax.Array, sign_method: str) -> jax.Array:
    """TIES' elect-and-merge: the mean of the weighted values that agree with the majority
    sign (of the unweighted values: their sum for ``'total'``, their signs' sum for
    ``'frequency'``), per element."""
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    mask = sign == jnp.where(magnitude >= 0, 1.0, -1.0)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    return (weighted * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)


def combine_tensors(tensors: Sequence[jax.Array], weights: Sequence[float], kind: str, *,
                    density: float | None = None, majority_sign_method: str = "total",
                    key: jax.Array | None = None) -> jax.Array:
    """PEFT's task-arithmetic family on same-shaped tensors: ``kind`` is ``'linear'``
    (task_arithmetic), ``'ties'``, ``'dare_linear'``, ``'dare_ties'`` or
    ``'magnitude_prune'`` (an ``_svd`` suffix is ignored).

    Example:
      >>> import jax.numpy as jnp
      >>> combine_tensors([jnp.ones(3), -jnp.ones(3)], [2.0, 1.0], "linear")
      Array([1., 1., 1.], dtype=float32)
    """
    kind = kind.removesuffix("_svd")
    w = jnp.asarray(weights, jnp.float32)
    if kind == "linear":
        pruned = list(tensors)
    else:
        method = "random" if kind.startswith("dare") else "magnitude"
        keys = jax.random.split(key, len(tensors)) if method == "random" else [None] * len(
            tensors)
        pruned = [_prune(t, density, method, k) for t, k in zip(tensors, keys)]
    stacked = jnp.stack(pruned)
    if kind.endswith("ties"):
        return _disjoint(stacked, w, majority_sign_method)
    return jnp.tensordot(w.astype(stacked.dtype), stacked, axes=1)


# ----------------------------------------------------------------------------- the adapter


def _check(tree, adapters, weights, name, combination_type, density, majority_sign_method,
           svd_rank, svd_clamp, key):
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ConfigError(f"add_weighted_adapter: adapters must be a non-empty list of adapter "
                          f"names, got {adapters!r}.")
    P.require_names(tree, tuple(adapters), "add_weighted_adapter")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"add_weighted_adapter: adapters {list(adapters)} name one twice.")
    if (isinstance(weights, str) or not isinstance(weights, Sequence)
            or len(weights) != len(adapters) or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
                for w in weights)):
        raise ConfigError(f"add_weighted_adapter: weights must be {len(adapters)} finite "
                          f"numbers, one per adapter, got {weights!r}.")
    P.check_name(name, "add_weighted_adapter")
    if name in P.adapter_names(tree):
        raise AlreadyInjectedError(
            f"add_weighted_adapter: this tree already holds an adapter named {name!r}; choose "
            f"another name or jlora.delete_adapter(params, {name!r}) first.")
    if combination_type not in TYPES:
        raise ConfigError(f"add_weighted_adapter: combination_type={combination_type!r}; "
                          f"choose one of {', '.join(TYPES)}.")
    if combination_type.startswith(_PRUNED) and (
            isinstance(density, bool) or not isinstance(density, int | float)
            or not 0 <= density <= 1):
        raise ConfigError(f"add_weighted_adapter: combination_type={combination_type!r} prunes: "
                          f"pass density in [0, 1] (the fraction kept), got {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"add_weighted_adapter: majority_sign_method="
                          f"{majority_sign_method!r}; choose 'total' or 'frequency'.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                 or svd_rank < 1):
        raise ConfigError(f"add_weighted_adapter: svd_rank must be a positive int or None, "
                          f"got {svd_rank!r}.")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(
            svd_clamp, int | float) or not 0 < svd_clamp <= 1):
        raise ConfigError(f"add_weighted_adapter: svd_clamp is a quantile in (0, 1], got "
                          f"{svd_clamp!r}.")
    if combination_type.startswith("dare") and not (
            isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype,
                                                                  jax.dtypes.prng_key)):
        raise KeyTypeError(f"add_weighted_adapter: combination_type={combination_type!r} "
                           "drops values at random: pass key=jax.random.key(0).")


def _found(tree: Any, adapters: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(module, param): {adapter: its view}}`` for the adapters combined."""
    found = P.check_adapters(tree, "add_weighted_adapter")
    bad = sorted({f"{n} ({m}.{p})" for (m, p, n), ad in found.items()
                  if n in adapters and ad.kind != "lora"})
    if bad:
        raise ConfigError(f"add_weighted_adapter combines LoRA adapters only (A, B and a "
                          f"scale), not DoRA adapters or trainable copies: {bad[0]}.")
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def fn(module, leaves):
        for n, view in P.views(leaves).items():
            if n in adapters:
                for param in P.adapter_params(view):
                    out.setdefault((module, param), {})[n] = view
        return leaves

    P.map_modules(tree, fn)
    return out


def add_weighted_adapter(
    params: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> Any:
    """Adds adapter ``name``: the weighted combination of ``adapters`` (PEFT's
    ``add_weighted_adapter``, same types, math and rank rules).

    Args:
      params: a tree holding the adapters (variables dict or bare params).
      adapters: the names to combine.
      weights: one weight per adapter (negative subtracts).
      name: the new adapter's name (must be new).
      combination_type: ``'svd'`` (default, as PEFT), ``'linear'``, ``'cat'``, ``'ties'``,
        ``'ties_svd'``, ``'dare_linear'``, ``'dare_ties'``, ``'dare_linear_svd'``,
        ``'dare_ties_svd'``, ``'magnitude_prune'``, ``'magnitude_prune_svd'``. With one
        adapter, ``'linear'`` (as PEFT).
      svd_rank: the rank of an ``_svd`` combination (default the largest of the adapters').
      svd_clamp: clamp the SVD factors to this quantile of their values (PEFT's
        ``svd_clamp``); the factors' signs are the SVD's, so clamped values may differ from
        PyTorch's.
      density: the fraction of values kept by the pruning types.
      majority_sign_method: ``'total'`` or ``'frequency'`` (the TIES types).
      key: a JAX PRNG key, required by the DARE types (random drops).

    Returns:
      The same kind of tree with the new adapter (scale 1: ``lora_alpha`` = its rank).

    Raises:
      AdapterNameError: an adapter that is not in the tree (lists the names).
      AlreadyInjectedError: ``name`` exists already.
      ConfigError: a bad argument; ranks that differ, or adapters that adapt different
        params, for an elementwise type (linear, ties, dare_*, magnitude_prune); DoRA
        adapters or trainable copies.
      KeyTypeError: a DARE type without a key.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> cfg = jlora.LoraConfig(rank=2, targets=["q"], init="random")
      >>> p = jlora.inject(p, cfg, jax.random.key(0))
      >>> p = jlora.inject(p, cfg, jax.random.key(1), name="b")
      >>> q = add_weighted_adapter(p, ["default", "b"], [0.5, 0.5], "mix",
      ...                          combination_type="cat")
      >>> d = jlora.delta(q)
      >>> bool(jnp.allclose(d["q.kernel@mix"], 0.5 * (d["q.kernel"] + d["q.kernel@b"]),
      ...                   atol=1e-6))
      True
    """
    tree = P.params_of(params)
    _check(tree, adapters, weights, name, combination_type, density, majority_sign_method,
           svd_rank, svd_clamp, key)
    adapters = list(adapters)
    kind = "linear" if len(adapters) == 1 else combination_type
    found = _found(tree, adapters)
    ranks = {n: max((int(np.shape(P.unbox(v[n][p + P.A_SUFFIX]))[-1])
                     for (_, p), v in found.items() if n in v), default=0) for n in adapters}
    if kind in ELEMENTWISE:
        if len(set(ranks.values())) != 1:
            raise ConfigError(f"add_weighted_adapter: combination_type={kind!r} combines A and "
                              f"B elementwise, so the adapters need equal ranks, got {ranks}; "
                              "use 'cat' or an '_svd' type for mixed ranks.")
        partial = sorted(f"{m}.{p}" if m else p for (m, p), v in found.items()
                         if set(v) != set(adapters))
        if partial:
            have = found[P.split_path(partial[0])]
            raise ConfigError(
                f"add_weighted_adapter: combination_type={kind!r} combines A and B "
                f"elementwise, so every adapter must adapt the same params; {partial[0]} is "
                f"adapted by {sorted(have)} only. Use 'cat' or an '_svd' type, which combine "
                "adapters with different targets.")
    new_rank = (sum(ranks.values()) if kind == "cat" else (svd_rank or max(ranks.values()))
                if kind in SVD else next(iter(ranks.values())))
    new: dict[str, dict[str, Any]] = {}
    for i, ((module, param), views) in enumerate(sorted(found.items())):
        k = None if key is None else jax.random.fold_in(key, i)
        a, b = _combine(kind, param, views, adapters, weights, ranks, new_rank, density,
                        majority_sign_method, svd_clamp, k)
        first = views[next(n for n in adapters if n in views)]
        new.setdefault(module, {}).update({
            P.named(param + role, name): _box_like(first[param + role], v)
            for role, v in ((P.A_SUFFIX, a), (P.B_SUFFIX, b),
                            (P.SCALE_SUFFIX, jnp.ones((), jnp.float32)))})
    return P.with_params(params, P.map_modules(tree, lambda m, ls: {**ls, **new.get(m, {})}))


def _box_like(leaf: Any, value: jax.Array) -> Any:
    """``value`` in ``leaf``'s box (its sharding names), if it has one."""
    return leaf.replace_boxed(value) if P.is_box(leaf) else value


def _combine(kind, param, views, adapters, weights, ranks, new_rank, density, sign_method,
             clamp, key):
    """The new adapter's ``(A, B)`` at one param."""
    get = lambda n, role: P.unbox(views[n][param + role])  # noqa: E731
    here = [(n, w) for n, w in zip(adapters, weights) if n in views]
    if kind == "cat":  # zero slots for the adapters this param lacks, as PEFT's layout
        a_parts, b_parts = [], []
        ref_a, ref_b = get(here[0][0], P.A_SUFFIX), get(here[0][0], P.B_SUFFIX)
        for n, w in zip(adapters, weights):
            if n in views:
                s = get(n, P.SCALE_SUFFIX)
                a = get(n, P.A_SUFFIX) * (w * s).astype(ref_a.dtype)
                b = get(n, P.B_SUFFIX)
            else:
                a = jnp.zeros(ref_a.shape[:-1] + (0,), ref_a.dtype)
                b = jnp.zeros((0,) + ref_b.shape[1:], ref_b.dtype)
            pad = ranks[n] - a.shape[-1]
            a_parts.append(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
            b_parts.append(jnp.pad(b, [(0, pad)] + [(0, 0)] * (b.ndim - 1)))
        return jnp.concatenate(a_parts, -1), jnp.concatenate(b_parts, 0)
    if kind in ELEMENTWISE:
        ws = [w * float(get(n, P.SCALE_SUFFIX)) for n, w in here]
        wa = [math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws]
        wb = [math.sqrt(abs(w)) for w in ws]
        ka, kb = (None, None) if key is None else jax.random.split(key)
        opts = dict(density=density, majority_sign_method=sign_method)
        a = combine_tensors([get(n, P.A_SUFFIX) for n, _ in here], wa, kind, key=ka, **opts)
        b = combine_tensors([get(n, P.B_SUFFIX) for n, _ in here], wb, kind, key=kb, **opts)
        return a, b
    # the _svd types: combine the full ΔW, keep the top new_rank directions (S on B's side)
    a0, b0 = get(here[0][0], P.A_SUFFIX), get(here[0][0], P.B_SUFFIX)
    in_shape, out_shape = a0.shape[:-1], b0.shape[1:]
    deltas = [(get(n, P.A_SUFFIX).reshape(-1, get(n, P.A_SUFFIX).shape[-1])
               @ get(n, P.B_SUFFIX).reshape(get(n, P.B_SUFFIX).shape[0], -1))
              * get(n, P.SCALE_SUFFIX).astype(a0.dtype) for n, _ in here]
    base = "linear" if kind == "svd" else kind
    m = combine_tensors(deltas, [w for _, w in here], base, density=density,
                        majority_sign_method=sign_method, key=key)
    u, s, vh = jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)
    r = min(new_rank, s.shape[0])
    a, b = u[:, :r], s[:r, None] * vh[:r]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    a = jnp.pad(a, [(0, 0), (0, new_rank - r)]).astype(a0.dtype)
    b = jnp.pad(b, [(0, new_rank - r), (0, 0)]).astype(b0.dtype)
    return a.reshape(*in_shape, new_rank), b.reshape(new_rank, *out_shape)
