"""save_peft: adapters trained in jlora run in PyTorch peft with the same outputs.

Each case trains a few adapter steps in jlora, exports them, loads the directory with
``peft.PeftModel.from_pretrained`` on the transformers model, and compares outputs; peft
must load every tensor it expects and nothing else (no missing/unexpected keys).
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers as tf
from safetensors import safe_open

import jlora
from jlora.hf.load import load
from jlora.hf.peft import save_peft

ATOL = 1e-4
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    return tf.LlamaConfig(**LLAMA, tie_word_embeddings=False)


def _llama_tied():
    return tf.LlamaConfig(**{**LLAMA, "num_hidden_layers": 1}, tie_word_embeddings=True)


def _qwen2():
    return tf.Qwen2Config(**{**LLAMA, "num_key_value_heads": 1}, tie_word_embeddings=False)


def _mistral():
    return tf.MistralConfig(**LLAMA, tie_word_embeddings=False, sliding_window=4)


def _gpt2():
    return tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0)


def _bert():
    return tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=32)


CASES = {
    # name: (transformers config, auto class, LoraConfig)
    "llama-patterns-embed": (_llama, tf.AutoModelForCausalLM, jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 24, r"layers\.1\.self_attn\.q_proj": 3},
        dropout=0.05)),
    # a tied head: PEFT's ensure_weight_tying gives lm_head the embedding's adapter, as jlora
    "llama-tied-embed": (_llama_tied, tf.AutoModelForCausalLM, jlora.LoraConfig(
        rank=4, alpha=8, targets=["k_proj", "embed_tokens"], alpha_pattern={"embed_tokens": 12})),
    "qwen2-all-linear-rslora": (_qwen2, tf.AutoModelForCausalLM, jlora.LoraConfig(
        rank=4, alpha=6, targets="all-linear", use_rslora=True, exclude=["o_proj"])),
    "mistral-sliding-window": (_mistral, tf.AutoModelForCausalLM, jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "o_proj", "gate_proj"])),
    "gpt2-conv1d": (_gpt2, tf.AutoModelForCausalLM, jlora.LoraConfig(
        rank=4, alpha=16, targets=["c_attn", "c_fc"], dropout=0.1)),
    "bert-automodel": (_bert, tf.AutoModel, jlora.LoraConfig(
        rank=4, alpha=8, targets=["query", "value"], layers=[1])),
}


def _inputs(name):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 61, (2, 9))
    mask = np.ones((2, 9), np.int64)
    if name.startswith("bert"):
        mask[1, 6:] = 0
    return ids, mask


def _apply(model, name, params, ids, mask):
    fwd = jlora.lora(model.apply)
    if name.startswith("bert"):
        return fwd(params, ids, mask).last_hidden_state
    return fwd(params, ids)


def _b_leaves(params):
    return {p: np.asarray(x) for p, x in jlora.paths.leaves_with_paths(params["params"])
            if p.endswith(jlora.paths.B_SUFFIX)}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory, save_hf, train_adapters):
    name = request.param
    make, auto, config = CASES[name]
    base_dir = tmp_path_factory.mktemp(f"{name}-base")
    save_hf(make(), base_dir, auto, attn_implementation="eager")
    model, params, _ = load(base_dir)
    ids, mask = _inputs(name)
    trained, ours = train_adapters(params, config,
                                   lambda p: _apply(model, name, p, ids, mask))
    # no hf_config: save_peft reads the model type from the base directory's config.json
    adapter_dir = save_peft(trained, config, tmp_path_factory.mktemp(name) / "adapter",
                            base_model_name_or_path=str(base_dir))
    return name, base_dir, adapter_dir, auto, config, trained, np.asarray(ours)


def test_adapters_trained(exported):
    *_, trained, _ = exported
    bs = _b_leaves(trained)
    assert bs and all(np.abs(b).max() > 1e-4 for b in bs.values())


def test_peft_runs_the_export_with_jlora_outputs(exported, peft_messages):
    name, base_dir, adapter_dir, auto, _, _, ours = exported
    ids, mask = _inputs(name)
    hf = auto.from_pretrained(base_dir, attn_implementation="eager").eval()
    with peft_messages() as messages:
        pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    assert not messages  # peft loads every architecture's export silently
    # peft expects exactly the tensors the file holds, with the same shapes
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(
        pm, save_embedding_layers=False).items()}
    assert saved == want
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref = (out.last_hidden_state if name.startswith("bert") else out.logits).numpy()
    keep = mask.astype(bool)
    diff = np.abs(ours[keep] - ref[keep]).max()
    print(f"{name}: max |jlora - peft| = {diff:.2e} (max |out| {np.abs(ref).max():.3g})")
    assert diff <= ATOL
    # the adapters change the outputs: the comparison is not between two base models
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    base = (base.last_hidden_state if name.startswith("bert") else base.logits).numpy()
    assert np.abs(base[keep] - ref[keep]).max() > 100 * ATOL


def test_adapter_config_keeps_every_field(exported):
    name, base_dir, adapter_dir, _, config, trained, _ = exported
    d = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA"
    assert d["r"] == config.rank and d["lora_alpha"] == config.alpha
    assert d["lora_dropout"] == config.dropout
    assert d["rank_pattern"] == dict(config.rank_pattern)
    tied = {"lm_head": 12} if name.endswith("tied-embed") else {}
    assert d["alpha_pattern"] == {**config.alpha_pattern, **tied}
    assert d.get("ensure_weight_tying", False) is bool(tied)
    assert d["use_rslora"] is config.use_rslora and d["use_dora"] is False
    assert d["base_model_name_or_path"] == str(base_dir)
    assert d["fan_in_fan_out"] is name.startswith("gpt2")
    assert d["task_type"] == ("FEATURE_EXTRACTION" if name.startswith("bert") else "CAUSAL_LM")
    assert d["init_lora_weights"] is True
    adapted = sorted({p.rsplit(".", 1)[0] for p in _b_leaves(trained)})
    if config.targets == "all-linear":
        assert d["target_modules"] == adapted  # resolved, as PEFT does
        assert not any("o_proj" in m or "lm_head" in m for m in adapted)
    else:
        assert d["target_modules"] == list(config.targets)
    assert d["layers_to_transform"] == (list(config.layers) if config.layers else None)
    assert d["exclude_modules"] == (list(config.exclude) if config.exclude else None)
    # peft's own reading of the config gives the same per-module ranks and scales
    pc = peft.LoraConfig.from_pretrained(adapter_dir)
    assert pc.r == config.rank and pc.lora_dropout == config.dropout


@pytest.mark.parametrize("exported", ["gpt2-conv1d"], indirect=True)  # one architecture
def test_merged_tree_exports_the_same_adapter(exported, tmp_path):
    name, _, adapter_dir, _, config, trained, _ = exported
    assert name == "gpt2-conv1d"
    again = save_peft(jlora.merge(trained), config, tmp_path / "merged", model_type="gpt2")
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f1, \
            safe_open(again / "adapter_model.safetensors", "np") as f2:
        assert sorted(f1.keys()) == sorted(f2.keys())
        for k in f1.keys():
            assert np.array_equal(f1.get_tensor(k), f2.get_tensor(k)), k
