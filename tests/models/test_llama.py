"""Llama / Mistral / Qwen2 linen models against transformers (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jlora
from jlora.hf.load import load
from jlora.models import arch_spec
from jlora.models.llama import SPEC, LlamaForCausalLM, rope_inv_freq

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CONFIGS = {
    "llama3": lambda: tf.LlamaConfig(
        **TINY, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False
    ),
    "llama-bias": lambda: tf.LlamaConfig(
        **TINY, num_key_value_heads=4, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5
    ),
    "mistral": lambda: tf.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None),
    "mistral-window": lambda: tf.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=3),
    "qwen2": lambda: tf.Qwen2Config(
        **TINY,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    ),
}


def _save(name, tmp_path, **save_kw):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong map shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **save_kw)
    return model


def _batch(length=9):
    rng = np.random.RandomState(1)
    ids = rng.randint(0, TINY["vocab_size"], (3, length))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    return ids, mask


# 136 positions: causal attention in 4 blocks of queries (jlora.models.llama._causal_blocks)
@pytest.mark.parametrize("length", [9, 136])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, length, tmp_path):
    torch_model = _save(name, tmp_path)
    model, params, hf_config = load(tmp_path)
    ids, mask = _batch(length)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(out - ref)[real].max() <= 1e-4
    # position_ids given explicitly (as generate does for left padding)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    out = model.apply(params, ids, attention_mask=mask, position_ids=pos)
    assert np.abs(np.asarray(out) - ref)[real].max() <= 1e-4


def test_param_paths_are_transformers_module_names(tmp_path):
    torch_model = _save("qwen2", tmp_path)
    _, params, _ = load(tmp_path)
    modules = dict(torch_model.named_modules())
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    paths = {".".join(k.key for k in kp[:-1]): kp[-1].key for kp, _ in flat}
    for path in [
        "model.embed_tokens",
        "model.layers.1.self_attn.k_proj",
        "model.norm",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.post_attention_layernorm",
    ]:
        assert path in paths and path in modules
    assert set(paths) <= set(modules)
    assert "lm_head" not in paths  # tied
    assert set(params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]) == {
        "kernel",
        "bias",
    }
    assert "bias" not in params["params"]["model"]["layers"]["0"]["self_attn"]["o_proj"]


def test_tree_matches_init_and_spec_round_trips():
    hf = CONFIGS["llama3"]().to_dict()
    model = SPEC.build(hf, None)
    params = model.init(jax.random.key(0), *SPEC.example_inputs(hf))
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    names = set()
    for kp, leaf in flat:
        path = tuple(k.key for k in kp)
        for name, array in SPEC.params_to_hf(path, np.asarray(leaf)):
            names.add(name)
            back_path, back = SPEC.hf_to_params(name, array)
            assert back_path == path and np.array_equal(back, np.asarray(leaf))
    assert names == SPEC.expected_hf_keys(hf)
    assert "lm_head" in params["params"]
    assert (
        arch_spec("mistral") is SPEC and SPEC.hf_to_params("model.rotary_emb.inv_freq", 0) is None
    )


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = CONFIGS["llama3"]()
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    np.testing.assert_allclose(rope_inv_freq(cfg.to_dict(), 8), ref.numpy(), rtol=1e-6)
    old_style = {"rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    expected = 1 / 500.0 ** (np.arange(0, 8, 2) / 8) / 2
    np.testing.assert_allclose(rope_inv_freq(old_style, 8), expected, rtol=1e-6)


def test_remat_and_bf16_run(tmp_path):
    _save("llama3", tmp_path)
    model, params, hf = load(tmp_path)
    ids, mask = _batch()
    ref = model.apply(params, ids, attention_mask=mask)
    remat = LlamaForCausalLM(model.config, remat=True)
    np.testing.assert_allclose(remat.apply(params, ids, attention_mask=mask), ref, atol=1e-6)
    grad = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, ids, attention_mask=mask).mean()))
    g1, g2 = grad(model)(params), grad(remat)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)
    # adapters reach the layers inside nn.remat too
    adapted = jlora.inject(
        params, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(1)
    )
    adapted = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.2 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    want = jlora.lora(model.apply)(adapted, ids, attention_mask=mask)
    assert not np.allclose(want, ref, atol=1e-3)
    got = jlora.lora(remat.apply)(adapted, ids, attention_mask=mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    bf_model, bf_params, _ = load(tmp_path, dtype=jnp.bfloat16)
    leaf = bf_params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    out = bf_model.apply(bf_params, ids, attention_mask=mask)
    assert out.dtype == jnp.bfloat16
    real = mask.astype(bool)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref))[real].max() < 0.1
