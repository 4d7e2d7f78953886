"""What every jlora model architecture provides to the HF I/O layer (``jlora.hf``).

Each architecture module (``llama``, ``gpt2``, ``bert``) defines one :class:`ArchSpec`
named ``SPEC``. Param paths equal transformers' module names, so most of the name map is
mechanical: ``<module>.weight`` -> ``<module>.kernel`` (transposed for nn.Linear) or
``<module>.embedding`` / ``<module>.scale``; ``<module>.bias`` -> ``<module>.bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A param keypath inside the 'params' collection, e.g. ("model", "layers", "0", "self_attn",
# "q_proj", "kernel").
ParamPath = tuple[str, ...]


def _none_optional(hf_config: Mapping[str, Any]) -> set[str]:
    return set()


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture maps onto a jlora linen model.

    Attributes:
      model_types: the ``model_type`` values of config.json this spec serves.
      check_config: ``(hf_config, source) -> None``: checks every config.json field the model
        reads, with its type and range, and rejects features the model does not implement;
        raises :class:`~jlora.errors.HFError` naming ``source`` (the file), the field and the
        fix. Cheap: no tracing, no arrays, nothing that grows with the sizes it reads. Every
        other function here may assume a config that passed it.
      num_layers: ``(hf_config) -> int``, the number of layers (each has tensors of its own,
        so a checkpoint holding fewer tensors than this cannot fit).
      build: ``(hf_config: dict, dtype) -> flax.linen.Module``.
      hf_to_params: ``(hf_tensor_name, array) -> (param path, array) | None``; ``None`` for
        tensors transformers stores but the model does not use (buffers).
      params_to_hf: ``(param path, array) -> list[(hf_tensor_name, array)]``; the inverse,
        an empty list for nothing to write (a tied head).
      expected_hf_shapes: ``(hf_config) -> {tensor name: shape}`` of the tensors a complete
        checkpoint holds, in transformers' layout, from the config alone (no tracing):
        ``hf.load`` checks the safetensors headers against it before building the model.
      auto_class: the transformers Auto class that loads a saved model.
      fan_in_fan_out: dotted module-name suffixes whose HF weight is stored (in, out)
        (GPT-2's Conv1D); PEFT export sets ``fan_in_fan_out: true`` for them.
      example_inputs: ``(hf_config) -> tuple`` of example arguments for ``model.init``.
      optional_hf_keys: ``(hf_config) -> set[str]``, a subset of ``expected_hf_keys`` that a
        checkpoint may lack, as transformers' Auto class allows (BERT's pooler, which
        ``BertForMaskedLM`` does not save); ``hf.load`` initialises those params from
        ``model.init`` and logs which. Defaults to none.
    """

    model_types: tuple[str, ...]
    check_config: Callable[[Mapping[str, Any], str], Any]
    num_layers: Callable[[Mapping[str, Any]], int]
    build: Callable[[Mapping[str, Any], Any], Any]
    hf_to_params: Callable[[str, np.ndarray], tuple[ParamPath, np.ndarray] | None]
    params_to_hf: Callable[[ParamPath, np.ndarray], list[tuple[str, np.ndarray]]]
    expected_hf_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
    auto_class: str
    example_inputs: Callable[[Mapping[str, Any]], tuple]
    fan_in_fan_out: tuple[str, ...] = field(default=())
    optional_hf_keys: Callable[[Mapping[str, Any]], set[str]] = field(default=_none_optional)

    def expected_hf_keys(self, hf_config: Mapping[str, Any]) -> set[str]:
        """The tensor names a complete checkpoint holds (the keys of ``expected_hf_shapes``)."""
        return set(self.expected_hf_shapes(hf_config))
