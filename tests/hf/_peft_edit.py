"""Edits of a saved PEFT adapter directory in place, for the import error tests."""

import json

from safetensors.numpy import load_file, save_file


def edit_tensors(path, fn):
    """Applies ``fn`` to the dict of ``adapter_model.safetensors``'s tensors and saves it."""
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, **changes):
    """Sets fields of ``adapter_config.json``."""
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
