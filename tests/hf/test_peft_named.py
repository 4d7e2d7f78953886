"""Named adapters with PyTorch peft, both ways: peft saves two adapters (the default at the
root, the other in a subfolder) and jlora loads both into one tree; jlora saves two names and
peft's ``load_adapter`` reads both. Each adapter selected in turn (and both together, PEFT's
multiple active adapters) gives peft's logits."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
import transformers as tf

import jlora
from jlora.errors import AdapterNameError, AlreadyInjectedError
from jlora.hf.load import load
from jlora.hf.peft import load_peft, save_peft

ATOL = 1e-4
IDS = np.random.RandomState(0).randint(0, 61, (2, 7))
CFG_A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CFG_B = dict(r=2, lora_alpha=6, target_modules=["k_proj", "v_proj", "down_proj"],
             use_rslora=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _torch(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _peft_set(model, adapter):
    """peft's logits with ``adapter`` (a name, a list, or None for the base) active."""
    if adapter is None:
        with model.disable_adapter():
            return _logits(model)
    model.base_model.set_adapter(adapter)
    return _logits(model)


SELECTIONS = ["default", "math", ["default", "math"], None]


def test_peft_saves_two_names_jlora_loads_both(base, tmp_path):
    model = peft.get_peft_model(_torch(base), peft.LoraConfig(**CFG_A,
                                                             init_lora_weights=False))
    model.add_adapter("math", peft.LoraConfig(**CFG_B, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "math" / "adapter_model.safetensors").is_file()
    jmodel, params, _ = load(base)
    p, cfg_a = load_peft(params, tmp_path)
    p, cfg_b = load_peft(p, tmp_path, name="math")  # reads tmp_path/math
    assert jlora.adapter_names(p) == ("default", "math")
    assert (cfg_a.rank, cfg_b.rank, cfg_b.use_rslora) == (4, 2, True)
    for adapter in SELECTIONS:
        want = _peft_set(model, adapter)
        sel = tuple(adapter) if isinstance(adapter, list) else adapter
        got = np.asarray(jlora.lora(jmodel.apply, adapter=sel)(p, IDS))
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=str(adapter))
    # not vacuous: the two adapters move the logits, each its own way
    base_logits = _peft_set(model, None)
    a, b = _peft_set(model, "default"), _peft_set(model, "math")
    assert np.abs(a - base_logits).max() > 1e-2 and np.abs(b - base_logits).max() > 1e-2
    assert np.abs(a - b).max() > 1e-2
    # a standalone adapter folder loads under a name too (PEFT's load_adapter(path, name))
    q, _ = load_peft(params, tmp_path / "math", name="other")
    np.testing.assert_allclose(np.asarray(jlora.lora(jmodel.apply)(q, IDS)), b, atol=ATOL)


def _perturb(p):
    leaves, tree = jax.tree_util.tree_flatten_with_path(p)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    out = []
    for (kp, x), k in zip(leaves, keys):
        stem = jlora.paths.parse_leaf(str(kp[-1].key))[0]
        out.append(x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                   if stem.endswith("_lora_b") else x)
    return jax.tree_util.tree_unflatten(tree, out)


def test_jlora_saves_two_names_peft_loads_both(base, tmp_path):
    jmodel, params, hf_config = load(base)
    ca = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    cb = jlora.LoraConfig(rank=2, alpha=6, targets=["k_proj", "v_proj", "down_proj"],
                          use_rslora=True)
    p = jlora.inject(params, ca, jax.random.key(0))
    p = _perturb(jlora.inject(p, cb, jax.random.key(1), name="math"))
    root = tmp_path / "adapters"
    save_peft(p, cb, root, name="math", hf_config=hf_config)
    save_peft(p, ca, root, hf_config=hf_config)
    before = (root / "math" / "adapter_model.safetensors").read_bytes()
    save_peft(p, ca, root, hf_config=hf_config)  # saving one name leaves the others in place
    assert (root / "math" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(f.name for f in root.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors", "math"]
    model = peft.PeftModel.from_pretrained(_torch(base), root)
    model.load_adapter(root / "math", adapter_name="math")
    for adapter in SELECTIONS:
        sel = tuple(adapter) if isinstance(adapter, list) else adapter
        want = np.asarray(jlora.lora(jmodel.apply, adapter=sel)(p, IDS))
        np.testing.assert_allclose(_peft_set(model, adapter), want, atol=ATOL,
                                   err_msg=str(adapter))
    # and back: both names load into one tree, bit-identical adapters
    q, _ = load_peft(params, root)
    q, _ = load_peft(q, root, name="math")
    for x, y in zip(jax.tree.leaves(q), jax.tree.leaves(p)):
        np.testing.assert_array_equal(x, y)
    assert jax.tree.structure(q) == jax.tree.structure(p)


def test_named_save_errors(base, tmp_path):
    _, params, hf_config = load(base)
    ca = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"])
    p = jlora.inject(params, ca, jax.random.key(0), name="math")
    with pytest.raises(AdapterNameError, match="no adapter named 'default'.*'math'"):
        save_peft(p, ca, tmp_path / "a", hf_config=hf_config)
    out = save_peft(p, ca, tmp_path / "a", name="math", hf_config=hf_config)
    assert out == tmp_path / "a" / "math"
    q, _ = load_peft(params, tmp_path / "a", name="math")
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named 'math'"):
        load_peft(q, tmp_path / "a", name="math")


def test_several_active_dora_adapters_add_up_as_peft(base, tmp_path):
    """With DoRA among the active adapters, each adds to what the previous ones gave (PEFT
    rescales the running output, not the base's): jlora follows the same order."""
    model = peft.get_peft_model(_torch(base), peft.LoraConfig(**CFG_A,
                                                             init_lora_weights=False))
    model.add_adapter("math", peft.LoraConfig(**CFG_B, use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # a magnitude away from the weight norm: DoRA's rescale is not 1
        for mod in model.modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer) and "math" in mod.lora_A:
                mod.lora_magnitude_vector["math"].weight.mul_(1.3)
    model.save_pretrained(tmp_path)
    jmodel, params, _ = load(base)
    p, _ = load_peft(params, tmp_path)
    p, _ = load_peft(p, tmp_path, name="math")
    for adapter in SELECTIONS:
        sel = tuple(adapter) if isinstance(adapter, list) else adapter
        got = np.asarray(jlora.lora(jmodel.apply, adapter=sel)(p, IDS))
        np.testing.assert_allclose(got, _peft_set(model, adapter), atol=ATOL,
                                   err_msg=str(adapter))
