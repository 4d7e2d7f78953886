"""Hugging Face in and out: base models from safetensors, PEFT adapters, merged exports.

* :func:`load` reads a transformers checkpoint directory into ``(model, params, hf_config)``.
* :func:`save_peft` / :func:`load_peft` write and read PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors``.
* :func:`save_merged` writes a directory that ``transformers`` loads with ``from_pretrained``.

No torch is needed for any of these.
"""

from jlora.hf.load import load
from jlora.hf.merged import save_merged
from jlora.hf.output import atomic_dir
from jlora.hf.peft import load_peft, save_peft

__all__ = ["atomic_dir", "load", "load_peft", "save_merged", "save_peft"]
