"""The precision policy: which dtypes the frozen base, the compute and the adapters use."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora import paths as P
from jlora.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Precision:
    """Dtypes of a LoRA train step.

    Adapters and optimizer state are always kept in float32 (the master copy); the frozen
    base is stored in ``frozen_dtype`` and the adapters are cast to ``compute_dtype`` inside
    the differentiated function, so their gradients come back in float32. The compute dtype
    of the model's own ops is the model's ``dtype`` attribute: build it with
    ``dtype=compute_dtype`` (jlora's models take ``dtype``).

    Attributes:
      frozen_dtype: dtype of the frozen params (floating leaves; ``*_lora_scale`` stays fp32).
      compute_dtype: dtype the adapters are cast to in the forward pass.

    Example:
      >>> import jax.numpy as jnp
      >>> p = Precision.bf16()
      >>> p.frozen_dtype, p.compute_dtype
      (dtype(bfloat16), dtype(bfloat16))
      >>> p.cast_frozen({"kernel": jnp.ones(2), "ids": jnp.ones(2, jnp.int32)})["kernel"].dtype
      dtype(bfloat16)
    """

    frozen_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("frozen_dtype", "compute_dtype"):
            dt = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dt, jnp.floating):
                raise ConfigError(f"{name}={dt}: must be a floating dtype (float32, bfloat16).")
            object.__setattr__(self, name, dt)

    @classmethod
    def bf16(cls) -> Precision:
        """Frozen weights and compute in bfloat16; adapters and optimizer state in float32."""
        return cls(jnp.bfloat16, jnp.bfloat16)

    def cast_frozen(self, frozen: Any) -> Any:
        """The frozen tree with its floating leaves (but adapter scales) in ``frozen_dtype``."""
        def cast(kp, x):
            if x is None or P.is_quantized(x) or not jnp.issubdtype(jnp.result_type(x),
                                                                     jnp.floating):
                return x
            if P.keypath_to_path(kp).endswith((P.SCALE_SUFFIX, P.MERGED_SUFFIX)):
                return x
            return x.astype(self.frozen_dtype)

        return jax.tree_util.tree_map_with_path(cast, frozen, is_leaf=P.is_leaf)

    def cast_compute(self, trainable: Any) -> Any:
        """The adapters cast to ``compute_dtype`` (inside the differentiated function)."""
        return jax.tree.map(lambda x: x.astype(self.compute_dtype), trainable)


def to_fp32(trainable: Any) -> Any:
    """Adapters as float32 master weights."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
