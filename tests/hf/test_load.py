"""jlora.hf.load and the safetensors helpers of jlora.hf.io: loading, sharding, errors."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import torch
import transformers as tf

from jlora.errors import HFError
from jlora.hf.io import (
    INDEX_FILE,
    SINGLE_FILE,
    LazyTensor,
    checkpoint_index,
    iter_tensors,
    parse_size,
    write_safetensors,
    write_weights,
)
from jlora.hf.load import load


@pytest.fixture(scope="module")
def saved(tmp_path_factory, save_hf):
    path = tmp_path_factory.mktemp("llama")
    cfg = tf.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return save_hf(cfg, path), path


def _copy(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "copy")


IDS = np.array([[3, 7, 1, 9, 4]])


def test_load_matches_transformers(saved):
    torch_model, path = saved
    model, params, hf_config = load(path)
    assert hf_config["model_type"] == "llama" and set(params) == {"params"}
    with torch.no_grad():
        ref = torch_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(model.apply(params, IDS), ref, atol=1e-4)


def test_sharded_checkpoint_loads(saved, tmp_path):
    torch_model, path = saved
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX_FILE).exists() and not (tmp_path / SINGLE_FILE).exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    model, params, _ = load(tmp_path)
    _, ref_params, _ = load(path)
    np.testing.assert_array_equal(model.apply(params, IDS), model.apply(ref_params, IDS))


def test_bf16_checkpoint_and_dtype(saved, tmp_path):
    torch_model, _ = saved
    tf.AutoModelForCausalLM.from_config(torch_model.config).to(torch.bfloat16).save_pretrained(
        tmp_path
    )
    assert {i.dtype for i in checkpoint_index(tmp_path).values()} == {np.dtype(ml_dtypes.bfloat16)}
    sd = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    _, params, _ = load(tmp_path)
    q = params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.float32
    want = sd["model.layers.0.self_attn.q_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(q), want)
    _, params16, _ = load(tmp_path, dtype=jnp.bfloat16)
    assert params16["params"]["model"]["norm"]["scale"].dtype == jnp.bfloat16


def test_error_not_a_model_dir(tmp_path):
    with pytest.raises(HFError, match=r"no config.json.*model.safetensors"):
        load(tmp_path)
    with pytest.raises(HFError, match="not a directory"):
        load(tmp_path / "absent")


def test_error_unsupported_model_type(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(HFError, match=r"unsupported model_type 'gpt_neox'.*llama"):
        load(path)


def test_error_no_weights(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / SINGLE_FILE).unlink()
    with pytest.raises(HFError, match="holds no safetensors weights"):
        load(path)


def test_error_missing_and_unexpected_tensors(saved, tmp_path, rewrite_weights):
    path = _copy(saved, tmp_path)

    def edit(t):
        t.pop("model.layers.1.mlp.up_proj.weight")
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
        return t

    rewrite_weights(path, edit)
    with pytest.raises(HFError) as info:
        load(path)
    msg = str(info.value)
    assert "missing tensors: 'model.layers.1.mlp.up_proj.weight'" in msg
    assert "unexpected tensors: 'model.layers.0.self_attn.extra.weight'" in msg


def test_error_shape_mismatch(saved, tmp_path, rewrite_weights):
    path = _copy(saved, tmp_path)
    rewrite_weights(
        path, lambda t: {**t, "model.layers.0.mlp.down_proj.weight": np.zeros((16, 20))}
    )
    with pytest.raises(HFError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(16, 20\)"
                       r".*implies \(16, 24\)"):  # fmt: skip
        load(path)


def test_error_truncated_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = (path / SINGLE_FILE).read_bytes()
    (path / SINGLE_FILE).write_bytes(data[:-100])
    with pytest.raises(HFError, match=r"model.safetensors' is truncated or corrupt"):
        load(path)
    (path / SINGLE_FILE).write_bytes(data[:5])
    with pytest.raises(HFError, match="too short"):
        load(path)
    (path / SINGLE_FILE).write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(HFError, match="does not parse"):
        load(path)


def test_error_shard_missing(saved, tmp_path):
    saved[0].save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(HFError, match=r"names shard 'model-00002-of-\d+.safetensors'.*absent"):
        load(tmp_path)


def test_write_read_round_trip(tmp_path):
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "c": LazyTensor((3,), np.dtype(np.int64), lambda: np.array([1, 2, 3])),
        "scalar": np.float16(2.5),
    }
    write_safetensors(tmp_path / SINGLE_FILE, tensors)
    back = dict(iter_tensors(tmp_path))
    for name in ("a", "b", "scalar"):
        np.testing.assert_array_equal(back[name], tensors[name])
        assert back[name].dtype == np.asarray(tensors[name]).dtype
    np.testing.assert_array_equal(back["c"], [1, 2, 3])
    with safetensors.safe_open(tmp_path / SINGLE_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("b").dtype == torch.bfloat16
        assert f.get_tensor("b").float().tolist() == [1.5, -2.0]
    bad = {"x": LazyTensor((2,), np.dtype(np.float32), lambda: np.zeros(3, np.float32))}
    with pytest.raises(HFError, match="declared F32"):
        write_safetensors(tmp_path / "bad.safetensors", bad)


def test_write_weights_shards(tmp_path):
    tensors = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}  # 40 bytes each
    files = write_weights(tmp_path, tensors, max_shard_size=100)
    assert files[-1] == INDEX_FILE and len(files) == 4  # 2 + 2 + 1 tensors
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    assert {n: a[0] for n, a in iter_tensors(tmp_path)} == {f"t{i}": i for i in range(5)}
    assert parse_size("1.5KB") == 1500 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(HFError, match="not a size"):
        parse_size("5 parsecs")


def test_tied_head_stored_anyway_is_ignored(tmp_path, save_hf, rewrite_weights):
    cfg = tf.Qwen2Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        sliding_window=2,  # ignored: use_sliding_window is False
    )
    torch_model = save_hf(cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sliding_window"] = 2  # as older Qwen2 configs store it, without layer_types
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    rewrite_weights(tmp_path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    model, params, _ = load(tmp_path)
    assert "lm_head" not in params["params"] and model.config.sliding_windows is None
    with torch.no_grad():
        ref = torch_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(model.apply(params, IDS), ref, atol=1e-4)


def test_error_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(HFError, match="has no model_type"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(HFError, match="not valid JSON"):
        load(tmp_path)
