"""layout(model, *args): a shape-only trace of which linen layer owns each kernel and how
its axes split into inputs and outputs.

A 2-D kernel is (in, out) and an embedding (vocab, features), so a bare params tree is
enough for them. A kernel with more axes (DenseGeneral, Einsum, Conv) is ambiguous from its
shape; ``layout`` records the split so ``inject`` never guesses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora.errors import LayoutError


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One adaptable layer seen by :func:`layout`.

    Attributes:
      kind: ``'dense'``, ``'dense_general'``, ``'einsum'``, ``'conv'`` or ``'embed'``.
      n_in: how many leading kernel axes are input axes (A takes them, B the rest).
      unsupported: why LoRA cannot adapt this layer, or ``None``.

    Example:
      >>> LayerInfo("conv", 2).n_in
      2
    """

    kind: str
    n_in: int
    unsupported: str | None = None


class Layout(Mapping[str, LayerInfo]):
    """Module path -> :class:`LayerInfo`, as returned by :func:`layout`.

    Example:
      >>> lay = Layout({"conv": LayerInfo("conv", 2)})
      >>> lay["conv"].kind, len(lay)
      ('conv', 1)
    """

    def __init__(self, infos: Mapping[str, LayerInfo]):
        self._infos = dict(infos)

    def __getitem__(self, path: str) -> LayerInfo:
        return self._infos[path]

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        rows = [f"  {p}: {i.kind} (n_in={i.n_in})" + (f" UNSUPPORTED: {i.unsupported}"
                                                     if i.unsupported else "")
                for p, i in self._infos.items()]
        return "Layout(\n" + "\n".join(rows) + "\n)"


def _einsum_split(einsum_str: str, kernel_ndim: int) -> tuple[int, str | None]:
    eq = einsum_str.replace(" ", "")
    lhs, out = eq.split("->")
    x, k = lhs.split(",")
    if "..." in k:
        return 0, "the kernel side of the einsum uses '...'"
    ins = [c for c in k if c in x and c not in out]
    outs = [c for c in k if c in out and c not in x]
    shared = [c for c in k if c in x and c in out]
    if shared:
        return 0, (f"kernel axes {''.join(shared)!r} of {einsum_str!r} appear in both the input "
                   "and the output (a batched kernel); LoRA's A @ B cannot express it")
    if len(ins) + len(outs) != len(k):
        return 0, f"kernel axes of {einsum_str!r} are summed away"
    if list(k[: len(ins)]) != ins:
        return 0, (f"in {einsum_str!r} the kernel's input axes {''.join(ins)!r} are not its "
                   "leading axes; reorder the kernel as (inputs..., outputs...)")
    if not ins or not outs:
        return 0, f"{einsum_str!r} has no input or no output kernel axis"
    return len(ins), None


def _info(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> LayerInfo | None:
    if isinstance(module, nn.Embed):
        return LayerInfo("embed", 1)
    if isinstance(module, nn.Dense):
        return LayerInfo("dense", 1)
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
        if module.batch_dims:
            return LayerInfo("dense_general", len(axis), "DenseGeneral with batch_dims")
        return LayerInfo("dense_general", len(axis))
    if isinstance(module, nn.Einsum):
        eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
        n_in, why = _einsum_split(eq, len(module.shape))
        return LayerInfo("einsum", n_in, why)
    if isinstance(module, nn.ConvTranspose):
        return LayerInfo("conv", 0, "ConvTranspose is not supported")
    if isinstance(module, nn.Conv):
        ndim = len(module.kernel_size) + 2
        why = None
        if module.feature_group_count != 1:
            why = "grouped convolution (feature_group_count > 1)"
        return LayerInfo("conv", ndim - 1, why)
    return None


def layout(model: nn.Module, *args: Any, method: Any = None, **kwargs: Any) -> Layout:
    """Traces ``model.init(key, *args, **kwargs)`` shape-only and records each layer's axes.

    Args:
      model: a linen module; or a Flax NNX module, whose layers are read directly (no trace:
        the example arguments are not needed).
      *args: example arguments (arrays or ``jax.ShapeDtypeStruct``s).
      method: optional method to init through (as in ``model.init(..., method=...)``).
      **kwargs: example keyword arguments.

    Returns:
      A :class:`Layout` to pass to ``inject(..., layout=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> m = nn.DenseGeneral(features=(2, 3), axis=-1)
      >>> lay = layout(m, jnp.zeros((1, 4)))
      >>> lay[""]
      LayerInfo(kind='dense_general', n_in=1, unsupported=None)
    """
    if any(c.__module__.startswith("flax.nnx") for c in type(model).__mro__):
        from jlora import nnx_tree  # Flax NNX: read from the layers, no trace

        return nnx_tree.layout(model)
    infos: dict[str, LayerInfo] = {}

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__":
            info = _info(mod, a, kw)
            if info is not None:
                path = ".".join(str(p) for p in mod.scope.path)
                old = infos.get(path)
                if old is not None and old != info:
                    raise LayoutError(f"layer {path!r} is called with different layouts "
                                      f"({old} vs {info}); LoRA needs one.")
                infos[path] = info
        return next_fun(*a, **kw)

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    init = lambda *a, **kw: model.init(rngs, *a, method=method, **kw)  # noqa: E731
    with nn.intercept_methods(interceptor):
        jax.eval_shape(init, *args, **kwargs)
    return Layout(infos)
