"""Hugging Face in and out: base models from safetensors, PEFT adapters, merged exports.

* :func:`load` reads a transformers checkpoint directory into ``(model, params, hf_config)``.
* :func:`save_peft` / :func:`load_peft` write and read PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors`` (LoRA, DoRA, ``modules_to_save``, bias modes);
  :class:`PeftExportWarning` says when ``save_peft`` could not tell the base model's type.
* :func:`save_merged` writes a directory that ``transformers`` loads with ``from_pretrained``.

The savers never destroy: they never write into a base model, refuse the current directory
and directories holding other files unless told ``overwrite=True``, replace only the files
they write, and survive a crash at any instant (:mod:`jlora.hf.output`). No torch is needed
for any of these.
"""

from jlora.hf.load import load
from jlora.hf.merged import save_merged
from jlora.hf.peft import PeftExportWarning, load_peft, save_peft

__all__ = ["PeftExportWarning", "load", "load_peft", "save_merged", "save_peft"]
