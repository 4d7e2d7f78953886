"""save_peft / load_peft with DoRA, modules_to_save and bias modes: every error, raised before
anything is written or loaded, naming the problem and the fix.

Bare params trees with transformers-style paths stand in for models: no compile, fast.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peft_edit import edit_config, edit_tensors
from safetensors.numpy import load_file

import jlora
from jlora import paths as P
from jlora.errors import ConfigError, HFError, LayoutError, ShapeError
from jlora.hf.peft import PeftExportWarning, load_peft, save_peft

LLAMA = {"model_type": "llama"}
MAG = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
HEAD = "base_model.model.lm_head.weight"
BIAS = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"


def _base(tied=False, extra=None):
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    tree = {"model": {
        "embed_tokens": {"embedding": f32(11, 8)},
        "layers": {"0": {"self_attn": {"q_proj": {"kernel": f32(8, 12), "bias": f32(12)},
                                       "k_proj": {"kernel": f32(8, 12), "bias": f32(12)}}}},
        "norm": {"scale": f32(8)},
    }}
    if not tied:
        tree["lm_head"] = {"kernel": f32(8, 11)}
    tree.update(extra or {})
    return {"params": tree}


def _perturbed(params):
    """B, magnitudes and copies away from their init, so that a wrong load would show."""
    def move(kp, x):
        name = P.keypath_to_path(kp)
        if name.endswith((P.B_SUFFIX, P.MAGNITUDE_SUFFIX, P.SAVED_SUFFIX)):
            return x * 1.5 + 0.25
        return x

    return jax.tree_util.tree_map_with_path(move, params)


DORA = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"], use_dora=True, bias="lora_only",
                        modules_to_save=["lm_head", "norm"])


@pytest.fixture
def adapter(tmp_path):
    base = _base()
    params = _perturbed(jlora.inject(base, DORA, jax.random.key(0)))
    return base, params, save_peft(params, DORA, tmp_path / "adapter", hf_config=LLAMA)


def test_the_adapter_round_trips(adapter):
    base, params, path = adapter
    tensors = load_file(path / "adapter_model.safetensors")
    assert tensors[HEAD].shape == (11, 8)  # nn.Linear's (out, in)
    np.testing.assert_array_equal(tensors[HEAD],
                                  np.asarray(params["params"]["lm_head"]["kernel_lora_saved"]).T)
    assert tensors[MAG].shape == (12,) and BIAS in tensors
    back, config = load_peft(base, path, hf_config=LLAMA)
    assert config == DORA
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for (p, a), (_, b) in zip(P.leaves_with_paths(back), P.leaves_with_paths(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


# --------------------------------------------------------------------------- save errors


@pytest.mark.parametrize("config, match", [
    (jlora.LoraConfig(**{**vars(DORA), "use_dora": False}),
     r"q_proj: the tree holds a DoRA adapter, the config has use_dora=False"),
    (jlora.LoraConfig(**{**vars(DORA), "bias": "none"}),
     r"copied in the tree but not by the config: 'model.layers.0.self_attn.q_proj.bias'"),
    (jlora.LoraConfig(**{**vars(DORA), "bias": "all"}),
     r"copied by the config \(modules_to_save, bias\) but not in the tree: "
     r"'model.layers.0.self_attn.k_proj.bias'"),
    (jlora.LoraConfig(**{**vars(DORA), "modules_to_save": ("lm_head",)}),
     r"copied in the tree but not by the config: 'model.norm.scale'"),
])
def test_save_with_a_config_that_does_not_give_the_tree(adapter, tmp_path, config, match):
    _, params, _ = adapter
    with pytest.raises(ConfigError, match=match):
        save_peft(params, config, tmp_path / "b", hf_config=LLAMA)
    assert not (tmp_path / "b").exists()


def test_a_plain_tree_with_a_dora_config(tmp_path):
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
    params = jlora.inject(_base(), config, jax.random.key(0))
    with pytest.raises(ConfigError, match="holds a plain LoRA adapter, the config has "
                                          "use_dora=True"):
        save_peft(params, jlora.LoraConfig(**{**vars(config), "use_dora": True}),
                  tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_kernel_copy_needs_the_model_type(adapter, tmp_path):
    """nn.Linear stores a kernel transposed, GPT-2's Conv1D as it is: jlora does not guess."""
    base, params, path = adapter
    with pytest.raises(HFError, match=r"lm_head.kernel has a trainable copy.*this model's type "
                                      r"is unknown. Pass hf_config="):
        save_peft(params, DORA, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(HFError, match=r"lm_head.kernel has a trainable copy.*type is unknown"):
        load_peft(base, path)  # no hf_config, and no local base_model_name_or_path
    # biases, norm scales and embeddings have one layout everywhere: no model type needed
    config = jlora.LoraConfig(**{**vars(DORA), "modules_to_save": ("norm", "embed_tokens")})
    params = _perturbed(jlora.inject(base, config, jax.random.key(0)))
    out = save_peft(params, config, tmp_path / "b")
    back, _ = load_peft(base, out)
    for (p, a), (_, b) in zip(P.leaves_with_paths(back), P.leaves_with_paths(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


def test_load_reads_the_model_type_from_a_local_base_directory(adapter, tmp_path):
    base, params, _ = adapter
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(LLAMA))
    out = save_peft(params, DORA, tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    back, _ = load_peft(base, out)  # no hf_config: base_model_name_or_path's config.json
    np.testing.assert_array_equal(back["params"]["lm_head"]["kernel_lora_saved"],
                                  params["params"]["lm_head"]["kernel_lora_saved"])


def test_a_copy_of_a_param_without_a_transformers_name(tmp_path):
    base = _base(extra={"score": {"kernel": jnp.ones((8, 3)), "temperature": jnp.ones(())}})
    config = jlora.LoraConfig(rank=2, targets=["q_proj"], modules_to_save=["score"])
    params = jlora.inject(base, config, jax.random.key(0))
    with pytest.raises(HFError, match="score.temperature has no transformers tensor of its own"):
        save_peft(params, config, tmp_path / "a", hf_config=LLAMA)
    assert not (tmp_path / "a").exists()


def test_a_copy_of_a_tied_input_embedding(tmp_path):
    base = _base(tied=True)  # no lm_head: the head reads embed_tokens
    config = jlora.LoraConfig(rank=2, targets=["q_proj"], modules_to_save=["embed_tokens"])
    params = jlora.inject(base, config, jax.random.key(0))
    with pytest.raises(HFError, match=r"'model.embed_tokens' is the input embedding this model "
                                      r"ties to its output head: a trainable copy"):
        save_peft(params, config, tmp_path / "a", hf_config=LLAMA)
    assert not (tmp_path / "a").exists()


def test_export_warns_when_the_base_config_does_not_read(tmp_path):
    config = jlora.LoraConfig(rank=2, targets=["q_proj"])
    params = jlora.inject(_base(), config, jax.random.key(0))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{")
    with pytest.warns(PeftExportWarning, match=r"config.json does not read.*Pass "
                                               r"hf_config=jlora.hf.load\(base\)\[2\]"):
        out = save_peft(params, config, tmp_path / "a",
                        base_model_name_or_path=str(tmp_path / "base"))
    d = json.loads((out / "adapter_config.json").read_text())
    assert d["task_type"] is None and d["fan_in_fan_out"] is False
    with warnings.catch_warnings():  # read from the base directory: nothing to warn about
        warnings.simplefilter("error")
        (tmp_path / "base" / "config.json").write_text(json.dumps(LLAMA))
        out = save_peft(params, config, tmp_path / "b",
                        base_model_name_or_path=str(tmp_path / "base"))
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


# --------------------------------------------------------------------------- load errors


def test_load_refuses_a_bad_hf_config(adapter):
    base, _, path = adapter
    with pytest.raises(HFError, match="hf_config must be the config.json dict.*got str"):
        load_peft(base, path, hf_config="llama")


@pytest.mark.parametrize("edit, cls, match", [
    (lambda t: t.pop(MAG), HFError, rf"missing tensors: '{MAG}'"),
    (lambda t: t.update({MAG: t[MAG][:8]}), ShapeError,
     r"lora_magnitude_vector' has shape \(8,\), but .*q_proj.kernel \(8, 12\) with rank 2 "
     r"needs \(12,\)"),
    (lambda t: t.pop(HEAD), HFError, rf"missing tensors: '{HEAD}'"),
    (lambda t: t.update({HEAD: t[HEAD].T.copy()}), ShapeError,
     r"lm_head.weight' has shape \(8, 11\), but the trainable copy of lm_head.kernel \(8, 11\) "
     r"needs \(11, 8\)"),
    (lambda t: t.pop(BIAS), HFError, "missing tensors: .*q_proj.base_layer.bias"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.bias":
                         np.zeros(12, np.float32)}), HFError,
     r"bias='lora_only'\): unexpected tensors: .*k_proj.bias'"),
])
def test_file_that_does_not_match_its_config(adapter, edit, cls, match):
    base, _, path = adapter
    edit_tensors(path, edit)
    with pytest.raises(cls, match=match):
        load_peft(base, path, hf_config=LLAMA)


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=False), rf"use_dora=False.*unexpected tensors: .*'{MAG}'"),
    (dict(bias="none"), r"bias='none'.*unexpected tensors: .*q_proj.base_layer.bias"),
    (dict(modules_to_save=["lm_head"]), r"unexpected tensors: 'base_model.model.model.norm"),
])
def test_config_that_does_not_match_its_file(adapter, changes, match):
    base, _, path = adapter
    edit_config(path, **changes)
    with pytest.raises(HFError, match=match):
        load_peft(base, path, hf_config=LLAMA)


def test_dora_on_a_layer_jlora_does_not_rescale(tmp_path):
    """PEFT has DoRA for embeddings and convolutions; jlora refuses them, never ignores."""
    base = _base()
    config = jlora.LoraConfig(rank=2, targets=["embed_tokens"])
    path = save_peft(jlora.inject(base, config, jax.random.key(0)), config, tmp_path / "a")
    edit_config(path, use_dora=True)
    edit_tensors(path, lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_magnitude_vector": np.ones(8, np.float32)}))
    with pytest.raises(LayoutError, match="model.embed_tokens.*DoRA adapts Dense, "
                                          "DenseGeneral and Einsum kernels only, not an Embed"):
        load_peft(base, path)

