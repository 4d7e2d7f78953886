"""save_merged: what transformers loads back computes jlora's logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jlora
import jlora.hf.io
from jlora.errors import HFError
from jlora.hf.io import INDEX_FILE, SINGLE_FILE
from jlora.hf.load import load
from jlora.hf.merged import save_merged

TINY = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = np.array([[3, 7, 1, 9, 4, 11], [5, 5, 2, 8, 30, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _loaded(tmp_path_factory, save_hf, cfg):
    path = tmp_path_factory.mktemp(cfg.model_type)
    save_hf(cfg, path)
    return load(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, save_hf):
    return _loaded(tmp_path_factory, save_hf, tf.LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, save_hf):
    return _loaded(tmp_path_factory, save_hf, tf.Qwen2Config(**TINY, tie_word_embeddings=True))


def _hf_logits(path, **kw):
    model, info = tf.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    with torch.no_grad():
        out = model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    return out.float().numpy()


def _jlora_logits(apply_fn, params):
    return np.asarray(apply_fn(params, IDS, attention_mask=MASK), np.float32)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_round_trip_through_transformers(name, request, tmp_path):
    model, params, hf_config = request.getfixturevalue(name)
    out = save_merged(model, params, hf_config, tmp_path / "merged")
    assert (out / SINGLE_FILE).exists() and (out / "config.json").exists()
    got = _hf_logits(out)
    real = MASK.astype(bool)
    assert np.abs(got - _jlora_logits(model.apply, params))[real].max() <= 1e-4


def test_sharded_export(llama, tmp_path):
    model, params, hf_config = llama
    out = save_merged(model, params, hf_config, tmp_path / "m", max_shard_size="8KB")
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / SINGLE_FILE).exists()
    assert all((out / s).exists() for s in shards)
    real = MASK.astype(bool)
    assert np.abs(_hf_logits(out) - _jlora_logits(model.apply, params))[real].max() <= 1e-4
    _, back, _ = load(out)  # and jlora reads its own export
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_adapters_are_merged_on_export(qwen2, tmp_path):
    model, params, hf_config = qwen2
    config = jlora.LoraConfig(rank=2, alpha=4, targets="all-linear")
    adapted = jlora.inject(params, config, jax.random.key(0))
    adapted = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.3 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    want = _jlora_logits(jlora.lora(model.apply), adapted)
    assert not np.allclose(want, _jlora_logits(model.apply, params), atol=1e-3)
    out = save_merged(model, adapted, hf_config, tmp_path / "m")
    real = MASK.astype(bool)
    assert np.abs(_hf_logits(out) - want)[real].max() <= 1e-4


def test_bf16_export(llama, tmp_path):
    model, params, hf_config = llama
    out = save_merged(model, params, hf_config, tmp_path / "m", dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    w = hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.bfloat16
    want = np.asarray(params["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]).T
    np.testing.assert_allclose(w.float().numpy(), want, rtol=1e-2, atol=1e-3)


def test_interrupted_export_leaves_no_directory(llama, tmp_path, monkeypatch):
    model, params, hf_config = llama
    calls = []
    real_write = jlora.hf.io.write_safetensors

    def failing_write(file, tensors, metadata=None):
        calls.append(file)
        if len(calls) == 2:  # the first shard is on disk; die inside the second
            raise KeyboardInterrupt
        return real_write(file, tensors, metadata)

    monkeypatch.setattr(jlora.hf.io, "write_safetensors", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_merged(model, params, hf_config, tmp_path / "m", max_shard_size="8KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_errors(llama, tmp_path):
    model, params, hf_config = llama
    bad = jax.tree.map(lambda x: x, params)
    del bad["params"]["model"]["layers"]["1"]["mlp"]["gate_proj"]
    with pytest.raises(HFError, match=r"missing \['model.layers.1.mlp.gate_proj.kernel'\]"):
        save_merged(model, bad, hf_config, tmp_path / "m")
    bad = jax.tree.map(lambda x: x, params)
    bad["params"]["model"]["norm"]["scale"] = jnp.ones(3)
    with pytest.raises(HFError, match=r"model.norm.scale \(3,\) != \(16,\)"):
        save_merged(model, bad["params"], hf_config, tmp_path / "m")
    assert not (tmp_path / "m").exists()
