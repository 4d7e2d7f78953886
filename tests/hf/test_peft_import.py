"""load_peft: adapters made by PyTorch peft run in jlora with peft's outputs; round trips.

Adapters are created with ``peft.get_peft_model(..., init_lora_weights=False)`` (B non-zero)
and saved by ``PeftModel.save_pretrained``; jlora loads them onto the same base checkpoint.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf

import jlora
from jlora.hf.load import load
from jlora.hf.peft import load_peft, save_peft

ATOL = 1e-4
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    # name: (transformers config, auto class, peft.LoraConfig kwargs)
    "llama-embed-patterns": (
        lambda: tf.LlamaConfig(**LLAMA, tie_word_embeddings=False), tf.AutoModelForCausalLM,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
             rank_pattern={"up_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 5},
             lora_dropout=0.1)),
    "qwen2-tied-embed-rslora-layers": (
        lambda: tf.Qwen2Config(**LLAMA, tie_word_embeddings=True), tf.AutoModelForCausalLM,
        dict(r=4, lora_alpha=3, target_modules=["k_proj", "o_proj", "gate_proj", "embed_tokens"],
             layers_to_transform=[1], use_rslora=True, ensure_weight_tying=True)),
    "gpt2-conv1d": (
        lambda: tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                              bos_token_id=0, eos_token_id=0),
        tf.AutoModelForCausalLM,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert-regex": (
        lambda: tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=48,
                              max_position_embeddings=32),
        tf.AutoModel,
        dict(r=2, lora_alpha=4, target_modules=r".*\.attention\.self\.(query|value)")),
}


def _inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 61, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, 7:] = 0
    return ids, mask


def _outputs(name, out):
    return out.last_hidden_state if name.startswith("bert") else out.logits


@pytest.fixture(scope="module", params=sorted(CASES))
def from_torch(request, tmp_path_factory, save_hf):
    name = request.param
    make, auto, kwargs = CASES[name]
    base_dir = tmp_path_factory.mktemp(f"{name}-base")
    hf = save_hf(make(), base_dir, auto, attn_implementation="eager")
    pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    with torch.no_grad():  # N(0, 1) embedding adapters make logits ~100: keep them moderate
        for n, p in pm.named_parameters():
            if "lora_embedding_B" in n:
                p.mul_(0.05)
    adapter_dir = tmp_path_factory.mktemp(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"...
        pm.save_pretrained(adapter_dir)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = _outputs(name, pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
    return name, base_dir, adapter_dir, kwargs, ref.numpy()


def test_jlora_runs_a_peft_adapter_with_peft_outputs(from_torch):
    name, base_dir, adapter_dir, kwargs, ref = from_torch
    model, base, _ = load(base_dir)
    params, config = load_peft(base, adapter_dir)
    assert config.rank == kwargs["r"] and config.use_rslora == kwargs.get("use_rslora", False)
    ids, mask = _inputs()
    out = jax.jit(jlora.lora(model.apply))(params, jnp.asarray(ids), jnp.asarray(mask))
    out = np.asarray(out.last_hidden_state if name.startswith("bert") else out)
    keep = mask.astype(bool)
    diff = np.abs(out[keep] - ref[keep]).max()
    print(f"{name}: max |jlora - peft| = {diff:.2e} (max |out| {np.abs(ref).max():.3g})")
    assert diff <= ATOL
    # same structure as inject builds, and the scales follow rank/alpha patterns and rsLoRA
    injected = jlora.inject(base, config, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(injected)
    for path, leaf in jlora.paths.leaves_with_paths(params["params"]):
        if path.endswith(jlora.paths.SCALE_SUFFIX):
            module = path.rsplit(".", 1)[0]
            r, a = config.rank_for(module), config.alpha_for(module)
            want = a / np.sqrt(r) if config.use_rslora else a / r
            assert leaf.dtype == jnp.float32 and np.isclose(float(leaf), want, rtol=1e-6)


@pytest.mark.parametrize("from_torch", ["gpt2-conv1d"], indirect=True)  # one architecture
def test_dtype_casts_the_adapters(from_torch):
    name, base_dir, adapter_dir, *_ = from_torch
    assert name == "gpt2-conv1d"
    _, base, _ = load(base_dir)
    params, _ = load_peft(base, adapter_dir, dtype=jnp.bfloat16)
    kinds = {p.rsplit("_", 1)[-1]: x.dtype for p, x in jlora.paths.leaves_with_paths(params)
             if "_lora_" in p}
    assert kinds == {"a": jnp.bfloat16, "b": jnp.bfloat16, "scale": jnp.float32}


def _assert_same_tree(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for (p, a), (_, b) in zip(jlora.paths.leaves_with_paths(x), jlora.paths.leaves_with_paths(y)):
        a, b = jlora.paths.unbox(a), jlora.paths.unbox(b)
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), p


ROUND_TRIPS = {
    "llama": (lambda: tf.LlamaConfig(**LLAMA, tie_word_embeddings=False), jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
        alpha_pattern={"embed_tokens": 3}, dropout=0.05, init="random", use_rslora=True)),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2,
                                   n_head=4), jlora.LoraConfig(
        rank=3, alpha=5, targets="all-linear", exclude=["c_proj"], init="random")),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_is_bit_exact(name, tmp_path):
    make, config = ROUND_TRIPS[name]
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(make()).save_pretrained(tmp_path / "base")
    _, base, hf_config = load(tmp_path / "base")
    params = jlora.inject(base, config, jax.random.key(3))
    out = save_peft(params, config, tmp_path / "adapter", hf_config=hf_config)
    back, config2 = load_peft(base, out)
    _assert_same_tree(back, params)
    if config.targets == "all-linear":  # written as the resolved module list
        assert config2 == jlora.LoraConfig(**{**vars(config), "targets": config2.targets})
    else:
        assert config2 == config
    # and again: the re-export of what was loaded is the same file
    again = save_peft(back, config2, tmp_path / "again", hf_config=hf_config)
    assert (again / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()


def test_round_trip_keeps_bare_trees_and_boxes(tmp_path):
    import flax.linen as nn

    model = nn.Dense(6, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                         ("embed", "mlp")))
    base = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    config = jlora.LoraConfig(rank=2, alpha=4, targets=".*", init="random")
    params = jlora.inject(base, config, jax.random.key(1))
    back, _ = load_peft(base, save_peft(params, config, tmp_path / "a"))
    assert jax.tree.structure(back, is_leaf=jlora.paths.is_box) == \
        jax.tree.structure(params, is_leaf=jlora.paths.is_box)
    assert back["kernel_lora_a"].names == params["kernel_lora_a"].names
    _assert_same_tree(back, params)
