"""save_peft / load_peft errors: raised before anything is written, naming problem and fix.

Bare params trees with transformers-style paths stand in for models: no compile, fast.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peft_edit import edit_config, edit_tensors

import jlora
import jlora.hf.peft as hp
from jlora.errors import (
    AlreadyInjectedError,
    ConfigError,
    HFError,
    JloraError,
    ShapeError,
    TargetError,
)
from jlora.hf.peft import load_peft, save_peft


def _base(in_dim=8, out_dim=12, layers=2, vocab=11):
    rng = np.random.default_rng(0)
    layer = lambda: {"self_attn": {m: {"kernel": jnp.asarray(rng.normal(size=(in_dim, out_dim)),
                                                             jnp.float32)}
                                   for m in ("q_proj", "k_proj")}}
    return {"params": {"model": {
        "embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(vocab, in_dim)), jnp.float32)},
        "layers": {str(i): layer() for i in range(layers)},
    }, "lm_head": {"kernel": jnp.zeros((in_dim, vocab), jnp.float32)}}}


CONFIG = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "embed_tokens"], init="random")


@pytest.fixture
def adapter(tmp_path):
    base = _base()
    params = jlora.inject(base, CONFIG, jax.random.key(0))
    return base, params, save_peft(params, CONFIG, tmp_path / "adapter")


def test_good_adapter_loads(adapter):
    base, params, path = adapter
    back, config = load_peft(base, path)
    assert config == CONFIG
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_other_peft_type(adapter):
    base, _, path = adapter
    edit_config(path, peft_type="IA3")
    with pytest.raises(ConfigError, match=r"peft_type='IA3'.*LoRA adapters only"):
        load_peft(base, path)


@pytest.mark.parametrize("field, value, feature", [
    ("layer_replication", [[0, 1]], "layer replication"),
    ("use_qalora", True, "QA-LoRA"),
    ("lora_bias", True, "a bias on lora_B"),
])
def test_unsupported_lora_feature(adapter, field, value, feature):
    base, _, path = adapter
    edit_config(path, **{field: value})
    with pytest.raises(ConfigError, match=f"{field}=.*{feature}.*jlora does not implement"):
        load_peft(base, path)


def test_target_modules_absent_from_the_model(adapter):
    _, _, path = adapter
    other = _base()
    for layer in other["params"]["model"]["layers"].values():
        layer["self_attn"]["v_proj"] = layer["self_attn"].pop("q_proj")
    with pytest.raises(TargetError) as e:
        load_peft(other, path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "model.layers.1.self_attn.q_proj" in msg
    assert "v_proj" in msg  # the nearest paths, to help spot a renamed module


def test_config_targets_match_nothing_in_the_model(adapter):
    _, _, path = adapter
    edit_config(path, target_modules=["w_proj"])
    with pytest.raises(TargetError, match="w_proj"):
        load_peft(_base(), path)


def test_shape_mismatch_names_tensor_and_shapes(adapter):
    _, _, path = adapter
    with pytest.raises(ShapeError) as e:
        load_peft(_base(in_dim=9), path)
    msg = str(e.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(2, 8)" in msg and "(2, 9)" in msg


def test_rank_in_file_differs_from_config(adapter):
    base, _, path = adapter
    edit_config(path, r=3, target_modules=["q_proj"])
    edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if "embed" in k])
    with pytest.raises(ShapeError, match=r"rank 3 needs \(3, 8\)"):
        load_peft(base, path)


def test_missing_tensor(adapter):
    base, _, path = adapter
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(path, lambda t: t.pop(key))
    with pytest.raises(HFError, match=rf"missing tensors: '{key}'"):
        load_peft(base, path)


def test_extra_tensor(adapter):
    base, _, path = adapter
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(path, lambda t: t.update({key: np.zeros((2, 8), np.float32)}))
    with pytest.raises(HFError, match=rf"unexpected tensors: '{key}'"):
        load_peft(base, path)


def test_stray_tensor(adapter):
    base, _, path = adapter
    edit_tensors(path, lambda t: t.update({"something.else": np.zeros(3, np.float32)}))
    with pytest.raises(HFError, match="unexpected tensors: 'something.else'"):
        load_peft(base, path)


def test_truncated_safetensors(adapter):
    base, _, path = adapter
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 40])
    with pytest.raises(HFError, match="truncated"):
        load_peft(base, path)


@pytest.mark.parametrize("what", ["no-dir", "no-config", "bad-json", "bin-only"])
def test_not_an_adapter_directory(adapter, what):
    base, _, path = adapter
    if what == "no-dir":
        path = path / "nope"
        match = "not a directory"
    elif what == "no-config":
        (path / "adapter_config.json").unlink()
        match = "no adapter_config.json"
    elif what == "bad-json":
        (path / "adapter_config.json").write_text("{")
        match = "not valid JSON"
    else:
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
        match = "safe_serialization=True"
    with pytest.raises(HFError, match=match):
        load_peft(base, path)


def test_load_onto_adapted_tree(adapter):
    """A second adapter loads beside the first only under another name, and never onto
    kernels that hold a merged adapter."""
    _, params, path = adapter
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named 'default'"):
        load_peft(params, path)
    with pytest.raises(HFError, match=r"merged into this tree's params .*jlora.unmerge"):
        load_peft(jlora.merge(params), path, name="second")
    with pytest.raises(ConfigError, match="adapter name"):
        load_peft(params, path, name="a/b")


def test_peft_base_embedding_replaces_the_base(adapter):
    """PEFT's save_embedding_layers stores the base embedding beside its adapter."""
    base, params, path = adapter
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    new = np.full((11, 8), 0.5, np.float32)
    edit_tensors(path, lambda t: t.update({key: new}))
    back, _ = load_peft(base, path)
    assert np.array_equal(back["params"]["model"]["embed_tokens"]["embedding"], new)
    edit_tensors(path, lambda t: t.update({key: np.zeros((12, 8), np.float32)}))
    with pytest.raises(ShapeError, match="embed_tokens.base_layer.weight"):
        load_peft(base, path)


# --------------------------------------------------------------------------- save errors


def test_save_without_adapters(tmp_path):
    with pytest.raises(HFError, match="no LoRA adapters"):
        save_peft(_base(), CONFIG, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("config, match", [
    (jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"]), "adapted but not targeted"),
    (jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "k_proj", "embed_tokens"]),
     "targeted by the config but not adapted"),
    (jlora.LoraConfig(rank=3, alpha=4, targets=["q_proj", "embed_tokens"]), "rank 2.*gives 3"),
    (jlora.LoraConfig(rank=2, alpha=5, targets=["q_proj", "embed_tokens"]), "scale 2.*2.5"),
    (jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "embed_tokens"], use_rslora=True),
     "use_rslora=True"),
])
def test_save_with_a_config_that_does_not_give_the_tree(adapter, tmp_path, config, match):
    _, params, _ = adapter
    with pytest.raises(ConfigError, match=match):
        save_peft(params, config, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_save_a_tied_input_embedding(tmp_path):
    rng = np.random.default_rng(0)
    base = {"transformer": {"wte": {"embedding": jnp.asarray(rng.normal(size=(11, 8)))},
                            "h": {"0": {"attn": {"c_attn": {"kernel": jnp.ones((8, 24))}}}}}}
    config = jlora.LoraConfig(rank=2, targets=["c_attn", "wte"])
    params = jlora.inject(base, config, jax.random.key(0))
    with pytest.raises(HFError, match=r"'transformer.wte' is the input embedding.*tie"):
        save_peft(params, config, tmp_path / "a", model_type="gpt2")
    assert not (tmp_path / "a").exists()
    # the head is not tied when the checkpoint says so
    out = save_peft(params, config, tmp_path / "b",
                    hf_config={"model_type": "gpt2", "tie_word_embeddings": False})
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_tied_head_adapter(tmp_path):
    base = _base()
    del base["params"]["lm_head"]  # a tied model: the head reads embed_tokens
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "embed_tokens"],
                              alpha_pattern={"embed_tokens": 6}, init="random")
    params = jlora.inject(base, config, jax.random.key(0))
    path = save_peft(params, config, tmp_path / "a", model_type="llama")
    d = json.loads((path / "adapter_config.json").read_text())
    assert d["ensure_weight_tying"] is True and d["alpha_pattern"] == {"embed_tokens": 6,
                                                                       "lm_head": 6}
    back, config2 = load_peft(base, path)
    assert config2 == config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    key = "base_model.model.lm_head.lora_A.weight"
    edit_tensors(path, lambda t: t.update({key: t[key] + 1}))
    with pytest.raises(HFError, match="not the tied transpose"):
        load_peft(base, path)
    edit_tensors(path, lambda t: t.update({key: t[key][:, :4]}))
    with pytest.raises(ShapeError, match="ties lm_head to model.embed_tokens"):
        load_peft(base, path)
    edit_config(path, alpha_pattern={"embed_tokens": 6, "lm_head": 7})
    with pytest.raises(ConfigError, match="rank/alpha"):
        load_peft(base, path)


def test_save_on_a_tied_model_lists_targets_when_lm_head_would_match(tmp_path):
    base = {"model": {"layers": {"0": {"mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}}}}}
    config = jlora.LoraConfig(rank=2, targets=r".*(down_proj|lm_head)")
    params = jlora.inject(base, config, jax.random.key(0))
    out = save_peft(params, config, tmp_path / "a", model_type="llama")
    d = json.loads((out / "adapter_config.json").read_text())
    assert d["target_modules"] == ["model.layers.0.mlp.down_proj"]


def test_save_multi_axis_kernel(tmp_path):
    import flax.linen as nn

    model = nn.DenseGeneral((2, 3))
    base = model.init(jax.random.key(0), jnp.ones((1, 4)))
    layout = jlora.layout(model, jnp.ones((1, 4)))
    config = jlora.LoraConfig(rank=2, targets=".*")
    params = jlora.inject(base, config, jax.random.key(0), layout=layout)
    with pytest.raises(HFError, match="2-D matrices only"):
        save_peft(params, config, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- atomic writes


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_interrupted_write_leaves_nothing_that_loads(adapter, tmp_path, monkeypatch):
    base, params, _ = adapter
    real = hp.write_safetensors

    def crash(file, tensors, metadata=None):
        real(file, dict(list(tensors.items())[:1]), metadata)  # half the tensors, then die
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(hp, "write_safetensors", crash)
    target = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        save_peft(params, CONFIG, target)
    assert not target.exists() and _leftovers(tmp_path) == []
    with pytest.raises(HFError, match="not a directory"):
        load_peft(base, target)


def test_interrupted_overwrite_keeps_the_previous_export(adapter, monkeypatch):
    base, params, path = adapter
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(file, tensors, metadata=None):
        with open(file, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(hp, "write_safetensors", crash)
    changed = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "embed_tokens"],
                               init="random", dropout=0.2)
    with pytest.raises(OSError, match="disk full"):
        save_peft(params, changed, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert _leftovers(path.parent) == []
    _, config = load_peft(base, path)
    assert config == CONFIG


def test_errors_are_jlora_errors():
    for cls in (HFError, ConfigError, TargetError, ShapeError):
        assert issubclass(cls, JloraError)
    assert os.path.basename(hp.WEIGHTS_FILE) == "adapter_model.safetensors"
