"""Fixtures shared by the test packages: tiny transformers checkpoints and their editing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jlora.hf.io import SINGLE_FILE, iter_tensors, write_safetensors


@pytest.fixture(scope="session")
def save_hf():
    """``save_hf(config, path, model_class=AutoModelForCausalLM, seed=0, **kw)``.

    Seeds torch, builds the transformers model (``model_class.from_config(config, **kw)`` for
    an Auto class, else ``model_class(config)``), saves it to ``path`` and returns it in eval
    mode. ``save_kw`` goes to ``save_pretrained``.
    """
    import torch
    import transformers as tf

    def save(config, path, model_class=tf.AutoModelForCausalLM, seed=0, save_kw=None, **kw):
        torch.manual_seed(seed)
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, **kw)
        else:
            model = model_class(config, **kw)
        model = model.eval()
        model.save_pretrained(path, **(save_kw or {}))
        return model

    return save


@pytest.fixture(scope="session")
def rewrite_weights():
    """``rewrite_weights(path, fn)``: model.safetensors := ``fn(dict of its tensors)``."""

    def rewrite(path, fn):
        tensors = dict(iter_tensors(path))
        write_safetensors(path / SINGLE_FILE, fn(tensors))

    return rewrite


@pytest.fixture(scope="session")
def edit_config():
    """``edit_config(path, fn)``: config.json := ``fn(its dict)``."""

    def edit(path, fn):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(fn(config)))

    return edit


@pytest.fixture(scope="session")
def check_name_map_round_trip():
    """``check(spec, path)``: the saved tensors map to params and back to themselves."""
    from safetensors.numpy import load_file

    def check(spec, path):
        hf_config = json.loads((path / "config.json").read_text())
        saved = load_file(path / "model.safetensors")
        assert set(saved) == spec.expected_hf_keys(hf_config)
        back = {}
        for name, array in saved.items():
            p, a = spec.hf_to_params(name, array)
            back.update(dict(spec.params_to_hf(p, a)))
        assert set(back) == set(saved)
        for k in saved:
            np.testing.assert_array_equal(back[k], saved[k])

    return check
