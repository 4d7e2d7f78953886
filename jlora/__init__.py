"""jlora: LoRA for JAX/Flax as pure functions over parameter pytrees.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))
  >>> params = jlora.inject(params, jlora.LoraConfig(rank=4, targets=".*"), jax.random.key(1))
  >>> print(jlora.summary(params))
  trainable params: 96 || all params: 232 || trainable%: 41.3793
"""

from jlora import errors
from jlora.adapters import adapter_names, delete_adapter, select
from jlora.config import LoraConfig
from jlora.errors import JloraError
from jlora.forward import lora
from jlora.inject import Plan, PlanEntry, inject, plan
from jlora.layout import LayerInfo, Layout, layout
from jlora.merge import delta, merge, unmerge
from jlora.optim import Summary, combine, labels, optimizer, split, summary
from jlora.quant import NF4, dequantize, quantize
from jlora.weighted import add_weighted_adapter

__version__ = "0.1.0"


def __getattr__(name):  # lazy sub-packages: jlora.hf, jlora.models, jlora.train, jlora.checkpoint
    import importlib

    if name in ("hf", "models", "train", "checkpoint", "quant"):
        return importlib.import_module(f"jlora.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "JloraError",
    "LayerInfo",
    "Layout",
    "LoraConfig",
    "NF4",
    "Plan",
    "PlanEntry",
    "Summary",
    "adapter_names",
    "add_weighted_adapter",
    "combine",
    "delete_adapter",
    "delta",
    "dequantize",
    "errors",
    "inject",
    "labels",
    "layout",
    "lora",
    "merge",
    "optimizer",
    "plan",
    "select",
    "quantize",
    "split",
    "summary",
    "unmerge",
]
