"""The exceptions jlora raises. Every one derives from :class:`JloraError`.

Each error is raised before any work is done and its message names the problem and the fix.
Subclasses also derive from the matching builtin (``ValueError``, ``TypeError``...) so that
generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "JloraError",
    "ConfigError",
    "TargetError",
    "ShapeError",
    "LayoutError",
    "AlreadyInjectedError",
    "NotInjectedError",
    "IncompleteAdapterError",
    "AdapterNameError",
    "KeyTypeError",
    "UnconsumedAdapterError",
    "HFError",
    "OutputPathError",
    "CheckpointError",
    "MeshError",
    "TrainingError",
    "DataError",
    "NnxStateError",
    "QuantizationError",
]


class JloraError(Exception):
    """Base class of every error jlora raises on bad input.

    Example:
      >>> import jlora
      >>> try:
      ...     jlora.LoraConfig(rank=0, targets=["q"])
      ... except jlora.JloraError as e:
      ...     print(type(e).__name__)
      ConfigError
    """


class ConfigError(JloraError, ValueError):
    """A LoraConfig field (or a PEFT adapter_config) holds an invalid value."""


class TargetError(JloraError, ValueError):
    """Target rules match nothing, or match something that cannot be adapted."""


class ShapeError(JloraError, ValueError):
    """A tensor has the wrong shape (a rank too large, an adapter that does not fit...)."""


class LayoutError(JloraError, ValueError):
    """A multi-axis kernel needs ``jlora.layout(model, *args)`` to be adapted, or is unsupported."""


class AlreadyInjectedError(JloraError, ValueError):
    """``inject`` was called on a tree that already holds adapters."""


class NotInjectedError(JloraError, ValueError):
    """A function that needs adapters got a tree without any."""


class IncompleteAdapterError(JloraError, ValueError):
    """An adapter misses one of its leaves (``<param>_lora_a``, ``_lora_b``, ``_lora_scale`` or
    ``_lora_merged``) or the param it adapts."""


class AdapterNameError(JloraError, KeyError):
    """An adapter name that the tree does not hold (the message lists those it does)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class KeyTypeError(JloraError, TypeError):
    """A PRNG key argument is not a JAX key."""


class UnconsumedAdapterError(JloraError, RuntimeError):
    """``lora(fn, on_unconsumed='raise')`` ran and no supported layer read some adapter."""


class HFError(JloraError, ValueError):
    """A Hugging Face directory, safetensors file or PEFT adapter cannot be read or written."""


class OutputPathError(HFError):
    """A save's target directory is not one jlora may write to (it would lose files there).

    Raised before anything is written: a base model's directory, or (without
    ``overwrite=True``) the current directory or a parent of it, or a directory holding
    other files. The message names the path, the reason and the fix.
    """


class CheckpointError(JloraError, ValueError):
    """An orbax checkpoint does not match this run (config, model, or a half-written step)."""


class MeshError(JloraError, ValueError):
    """A mesh, a partition rule, or a batch layout does not fit the devices or the data."""


class TrainingError(JloraError, RuntimeError):
    """Training cannot go on (for example too many non-finite steps in a row)."""


class DataError(JloraError, ValueError):
    """Training or evaluation data is missing, empty, or lacks a field it needs."""


class NnxStateError(JloraError, ValueError):
    """A Flax NNX state does not fit the graphdef given to ``jlora.lora(graphdef)`` (it
    belongs to another model), or is not a state jlora can read."""


class QuantizationError(JloraError, ValueError):
    """A kernel cannot be quantized (shape, block size, already quantized), a 4-bit
    checkpoint uses a format jlora does not read, or gradients were asked of a quantized
    (frozen) leaf."""
