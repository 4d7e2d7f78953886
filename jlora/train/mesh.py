"""Device meshes, partition rules and batch layout.

A :class:`~jax.sharding.Mesh` with named axes (``data``, ``fsdp``, ``tensor``); partition
rules (regex -> ``PartitionSpec``) give every frozen param its spec, and each adapter derives
its spec from the kernel it adapts (A takes the kernel's input axes, B its output axes, the
rank axis is replicated). Batches are split over the data axes (``data`` and ``fsdp``) and
assembled from each process's rows with :func:`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jlora import paths as P
from jlora.errors import MeshError

AXES = ("data", "fsdp", "tensor")
# Mesh axes a batch is split over (those present in the mesh).
BATCH_AXES = ("data", "fsdp")

# A rule: (regex searched in the dotted param path, PartitionSpec). The first match wins.
Rule = tuple[str, PS]

_COL = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|c_attn|c_fc|query|key|value|" \
       r"intermediate\.dense|fc1|wi|up|qkv)"
_ROW = r"(o_proj|down_proj|c_proj|attention\.output\.dense|output\.dense|fc2|wo|down|out)"

DEFAULT_RULES: tuple[Rule, ...] = (
    # column-parallel projections: (in, out) = (fsdp, tensor); their bias follows the output
    (rf"(^|\.){_COL}\.kernel$", PS("fsdp", "tensor")),
    (rf"(^|\.){_COL}\.bias$", PS("tensor")),
    # row-parallel projections: (in, out) = (tensor, fsdp)
    (rf"(^|\.){_ROW}\.kernel$", PS("tensor", "fsdp")),
    # output head (hidden, vocab) and embeddings (vocab, hidden)
    (r"(^|\.)lm_head\.kernel$", PS("fsdp", "tensor")),
    (r"\.embedding$|^embedding$", PS("tensor", "fsdp")),
    # any other matrix: shard its first axis over fsdp
    (r"\.kernel$|^kernel$", PS("fsdp")),
    # everything else (norms, biases, scalars) is replicated
    (r".*", PS()),
)
"""Partition rules for jlora's models (Llama/Mistral/Qwen2, GPT-2, BERT) and for linen
transformers that use the same layer names: Megatron-style tensor parallelism (column- then
row-parallel projections) over ``tensor``, with the other matrix axis over ``fsdp``."""


def make_mesh(shape: Mapping[str, int] | Sequence[int], axis_names: Sequence[str] = AXES,
              *, devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh with named axes.

    Devices are taken in ``jax.devices()`` order (process by process), so the leading axis
    (``data``) spans processes in a multi-host run.

    Args:
      shape: ``{"data": 2, "fsdp": 2, "tensor": 2}`` (one size may be ``-1``: the rest of the
        devices), or a sequence of sizes for ``axis_names``.
      axis_names: names of the axes when ``shape`` is a sequence.
      devices: the devices to use (default ``jax.devices()``); the mesh may use fewer.

    Returns:
      A :class:`jax.sharding.Mesh`.

    Raises:
      MeshError: a size that is not positive, or a mesh larger than the devices.

    Example:
      >>> mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.devices()[:4])
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 4, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        names, sizes = tuple(shape), [shape[k] for k in shape]
    else:
        names, sizes = tuple(axis_names), list(shape)
        if len(names) != len(sizes):
            raise MeshError(f"mesh shape {tuple(sizes)} has {len(sizes)} axes but axis_names "
                            f"{names} has {len(names)}; give one size per axis.")
    bad = [(n, s) for n, s in zip(names, sizes) if not isinstance(s, int) or (s < 1 and s != -1)]
    if bad or sizes.count(-1) > 1:
        raise MeshError(f"mesh shape {dict(zip(names, sizes))}: sizes must be positive ints, "
                        "with at most one -1 (the rest of the devices).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"mesh shape {dict(zip(names, sizes))}: {len(devices)} devices do "
                            f"not divide by the fixed axes' product {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    n = math.prod(sizes)
    if n > len(devices):
        raise MeshError(
            f"mesh {dict(zip(names, sizes))} needs {n} devices but only {len(devices)} are "
            f"available ({jax.process_count()} process(es), {jax.local_device_count()} local "
            "device(s) each); shrink an axis, or on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax.")
    return Mesh(np.array(devices[:n], dtype=object).reshape(sizes), names)


def single_device_mesh(device: Any = None) -> Mesh:
    """A 1x1x1 mesh (``data``, ``fsdp``, ``tensor``) on one device: the same code path as a
    sharded run, on one CPU.

    Example:
      >>> dict(single_device_mesh().shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    return make_mesh((1, 1, 1), devices=[device or jax.devices()[0]])


def check_rules(rules: Sequence[Rule], mesh: Mesh) -> tuple[tuple[re.Pattern, PS], ...]:
    """Compiles and validates partition rules against a mesh.

    Raises:
      MeshError: a rule that is not ``(regex, PartitionSpec)``, an invalid regex, or a spec
        that names an axis the mesh does not have.
    """
    out = []
    names = set(mesh.axis_names)
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], PS)):
            raise MeshError(f"partition rule {i} is {rule!r}; a rule is (regex, PartitionSpec), "
                            "e.g. (r'q_proj\\.kernel$', PartitionSpec('fsdp', 'tensor')).")
        pattern, spec = rule
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise MeshError(f"partition rule {i}: {pattern!r} is not a valid regex "
                            f"({e}).") from None
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None and axis not in names:
                    raise MeshError(
                        f"partition rule {i} ({pattern!r} -> {spec}) names mesh axis {axis!r}, "
                        f"but the mesh has axes {tuple(mesh.axis_names)}; rename the axis or "
                        "build the mesh with it (a size-1 axis is fine).")
        out.append((rx, spec))
    return tuple(out)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    axes = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> PS:
    """Drops the mesh axes of dims they do not divide (that dim is then replicated)."""
    return PS(*(e if d % _axis_size(mesh, e) == 0 else None for e, d in zip(spec, shape)))


def _rule_spec(path: str, shape: Sequence[int], rules, mesh: Mesh) -> PS:
    for rx, spec in rules:
        if rx.search(path):
            if len(spec) > len(shape):
                raise MeshError(f"partition rule {rx.pattern!r} gives {spec} ({len(spec)} axes) "
                                f"to {path} of shape {tuple(shape)}; make the rule more specific.")
            return _fit(tuple(spec) + (None,) * (len(shape) - len(spec)), shape, mesh)
    return PS()


def param_specs(params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
    """A PartitionSpec for every leaf of an adapted params tree (``None`` leaves stay None).

    Frozen params take the first rule whose regex is found (``re.search``) in their dotted
    path (``model.layers.0.self_attn.q_proj.kernel``, without the collection name); no match
    means replicated. An adapter's spec comes from its kernel's: A = (kernel input axes...,
    None), B = (None, kernel output axes...), DoRA's magnitude = (kernel output axes...); its
    scale is replicated; a trainable copy takes its param's spec. A mesh axis that does
    not divide a dim is dropped for that dim (replicated).

    Args:
      params: a (possibly split) adapted tree or variables dict; arrays or shape structs.
      mesh: the mesh.
      rules: ``(regex, PartitionSpec)`` pairs; :data:`DEFAULT_RULES` by default.

    Example:
      >>> import jax.numpy as jnp
      >>> mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
      >>> p = {"q_proj": {"kernel": jnp.zeros((8, 4)), "kernel_lora_a": jnp.zeros((8, 2)),
      ...                 "kernel_lora_b": jnp.zeros((2, 4))}}
      >>> s = param_specs(p, mesh)["q_proj"]
      >>> s["kernel"], s["kernel_lora_a"], s["kernel_lora_b"]
      (P('fsdp', 'tensor'), P('fsdp', None), P(None, 'tensor'))
    """
    if P.is_nnx_state(params):  # Flax NNX: a State of specs (jlora/nnx_tree.py)
        from jlora import nnx_tree

        return nnx_tree.like(params, param_specs(nnx_tree.to_pure(params), mesh, rules))
    compiled = check_rules(rules, mesh)
    tree = P.params_of(params)
    shapes = {path: tuple(np.shape(P.unbox(leaf))) for path, leaf in P.leaves_with_paths(tree)
              if leaf is not None}

    def spec_of(kp, leaf):
        if P.is_quantized(leaf):  # an NF4 leaf (jlora.quant): its arrays replicated
            return jax.tree.map(lambda _: PS(), leaf)
        path = P.keypath_to_path(kp)
        if P.is_variables(params):
            path = path.split(".", 1)[1] if "." in path else ""
        shape = tuple(np.shape(P.unbox(leaf)))
        module, name = P.split_path(path)
        if not P.is_adapter_name(name):
            return _rule_spec(path, shape, compiled, mesh)
        base = P.base_name(name)
        name = P.parse_leaf(name)[0]  # its role, whatever the adapter's name
        kpath = f"{module}.{base}" if module else base
        kshape = shapes.get(kpath)
        if kshape is None or name.endswith((P.SCALE_SUFFIX, P.MERGED_SUFFIX)):
            return PS()  # the scale (or an adapter whose kernel is not in this tree)
        kspec = tuple(_rule_spec(kpath, kshape, compiled, mesh))
        if name.endswith((P.SAVED_SUFFIX, P.ORIGINAL_SUFFIX)):  # a copy: the param's own
            return _fit(kspec, shape, mesh)
        if name.endswith((P.MAGNITUDE_SUFFIX, P.NORM_SUFFIX)):  # per output feature
            return _fit(kspec[len(kshape) - len(shape):], shape, mesh)
        is_a = name.endswith(P.A_SUFFIX)
        n_in = len(shape) - 1 if is_a else len(kshape) - (len(shape) - 1)
        spec = (*kspec[:n_in], None) if is_a else (None, *kspec[n_in:])
        return _fit(spec, shape, mesh)

    return jax.tree_util.tree_map_with_path(spec_of, params, is_leaf=P.is_leaf)


def named(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for every PartitionSpec of a tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PS))


def batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The mesh axes a batch's leading dim is split over (``data``, ``fsdp`` when present)."""
    return tuple(a for a in axes if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """The sharding of a batch array: leading dim over the data axes, the rest replicated.

    Example:
      >>> batch_sharding(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})).spec
      P(('data', 'fsdp'),)
    """
    return NamedSharding(mesh, PS(batch_axes(mesh, axes) or None))


def check_batch(batch: Any, sharding: NamedSharding, multiple: int = 1, *,
                scale: int = 1) -> None:
    """Raises :class:`MeshError` unless every array's leading dim (times ``scale``: the
    process count for per-process data) divides across the data axes times ``multiple``
    (the number of micro-batches)."""
    n = _axis_size(sharding.mesh, sharding.spec[0] if len(sharding.spec) else None)
    for path, x in P.leaves_with_paths(batch):
        shape = np.shape(x)
        if not shape:
            raise MeshError(f"batch entry {path!r} is a scalar; every batch entry needs a "
                            "leading batch dim.")
        rows = shape[0] * scale
        if rows % (n * multiple):
            what = f"{n} data-parallel shards" + (f" x {multiple} micro-batches"
                                                  if multiple > 1 else "")
            raise MeshError(
                f"batch entry {path!r} has {rows} rows, which do not divide across {what} "
                f"(mesh axes {sharding.spec[0]}); use a global batch that is a multiple of "
                f"{n * multiple}.")


def process_rows(global_rows: int, sharding: NamedSharding) -> slice:
    """The rows of a global batch that this process's devices hold (contiguous)."""
    idx = sharding.addressable_devices_indices_map((global_rows,))
    spans = {(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
             for i in idx.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise MeshError("this process's devices do not hold a contiguous block of the batch; "
                        "build the mesh with make_mesh (devices in process order).")
    return slice(lo, hi)


def shard_batch(batch: Any, sharding: NamedSharding, *, is_global: bool = True,
                multiple: int = 1) -> Any:
    """Lays a batch out across the devices (and processes) of a mesh.

    Args:
      batch: a pytree of host arrays. With ``is_global`` (default) each holds the whole
        global batch (every process passes the same data; each keeps only its rows);
        otherwise this process's rows only (``global rows / process_count``, in process
        order).
      sharding: from :func:`batch_sharding` (``shardings.batch`` of :func:`jlora.train.init`).
      is_global: whether ``batch`` is the global batch or this process's part.
      multiple: the global batch must divide by the data-axes size times this (the
        number of micro-batches).

    Returns:
      The batch as global :class:`jax.Array`s (``jax.make_array_from_process_local_data``).

    Raises:
      MeshError: a batch that does not divide across the data axes.

    Example:
      >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
      >>> x = shard_batch({"ids": np.zeros((8, 3), np.int32)}, batch_sharding(mesh))["ids"]
      >>> x.shape, x.sharding.spec, x.addressable_shards[0].data.shape
      ((8, 3), P(('data', 'fsdp'),), (2, 3))
    """
    scale = 1 if is_global else jax.process_count()
    check_batch(batch, sharding, multiple, scale=scale)
    target = NamedSharding(sharding.mesh, PS(*sharding.spec[:1]))

    def place(x):
        x = np.asarray(x)
        rows = x.shape[0] * scale
        local = x[process_rows(rows, sharding)] if is_global else x
        return jax.make_array_from_process_local_data(target, local, (rows, *x.shape[1:]))

    return jax.tree.map(place, batch)


def put(tree: Any, shardings: Any) -> Any:
    """Places a tree of host or single-device arrays onto (possibly multi-host) shardings.

    Every process must pass the same values; each keeps the shards of its own devices.
    ``None`` leaves stay None.

    Example:
      >>> mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
      >>> x = put({"w": np.ones((16, 2)), "b": None}, {"w": NamedSharding(mesh, PS("fsdp")),
      ...                                              "b": None})
      >>> x["w"].addressable_shards[0].data.shape, x["b"]
      ((2, 2), None)
    """
    def one(x, s):
        if x is None:
            return None
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda y: y, out_shardings=s)(x)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, s)  # a typed key (an NNX rng stream's): no host copy
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)
