"""GPT-2 parity with transformers' GPT2LMHeadModel, param names, name map and KV cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora.errors import JloraError
from jlora.hf.load import load
from jlora.hf.merged import save_merged
from jlora.hf.peft import save_peft
from jlora.models.generate import generate
from jlora.models.gpt2 import SPEC, GPT2Config, GPT2LMHeadModel

TINY = dict(
    vocab_size=97,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=0,
    eos_token_id=0,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_hf):
    path = tmp_path_factory.mktemp("gpt2")
    return save_hf(transformers.GPT2Config(**TINY), path, transformers.GPT2LMHeadModel), path


def _paths(tree):
    return {p for p, _ in jlora.paths.leaves_with_paths(tree)}


def test_logits_match_transformers_with_padding(tiny):
    hf, path = tiny
    model, params, _ = load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        ).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    keep = mask.astype(bool)
    assert np.abs(out[keep] - ref[keep]).max() <= 1e-4
    # default position_ids = arange, as transformers
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids[:2]), attention_mask=torch.tensor(mask[:2])).logits
    out = np.asarray(model.apply(params, jnp.asarray(ids[:2]), jnp.asarray(mask[:2])))
    assert np.abs(out[keep[:2]] - ref.numpy()[keep[:2]]).max() <= 1e-4


def test_param_paths_equal_transformers_module_names(tiny):
    hf, path = tiny
    model, params, hf_config = load(path)
    init = jax.eval_shape(model.init, jax.random.key(0), *SPEC.example_inputs(hf_config))
    modules = {n for n, _ in hf.named_modules()}
    tensors = {n for n, _ in hf.named_parameters()}
    jl = _paths(init["params"])
    assert {p.rsplit(".", 1)[0] for p in jl} <= modules
    assert {p.rsplit(".", 1)[0] for p in jl} == {t.rsplit(".", 1)[0] for t in tensors}
    assert _paths(params["params"]) == jl
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, init)


def test_name_map_round_trip(tiny, check_name_map_round_trip):
    check_name_map_round_trip(SPEC, tiny[1])


def test_name_map_reads_openai_era_names():
    # OpenAI-era names: no prefix, causal-mask buffers
    assert SPEC.hf_to_params("h.0.attn.bias", np.zeros((1, 1, 4, 4))) is None
    assert SPEC.hf_to_params("h.3.attn.masked_bias", np.zeros(())) is None
    path_, _ = SPEC.hf_to_params("h.3.attn.c_attn.bias", np.zeros(3))
    assert path_ == ("transformer", "h", "3", "attn", "c_attn", "bias")
    path_, _ = SPEC.hf_to_params("wte.weight", np.zeros((3, 2)))
    assert path_ == ("transformer", "wte", "embedding")


def test_untied_head(tmp_path, save_hf):
    cfg = transformers.GPT2Config(**TINY, tie_word_embeddings=False)
    hf = save_hf(cfg, tmp_path, transformers.GPT2LMHeadModel, seed=1)
    model, params, _ = load(tmp_path)
    assert params["params"]["lm_head"]["kernel"].shape == (TINY["n_embd"], TINY["vocab_size"])
    ids = np.arange(12).reshape(2, 6)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids)))
    assert np.abs(out - ref).max() <= 1e-4


def test_kv_cache_decode_equals_full_forward(tiny):
    _, path = tiny
    model, params, _ = load(path)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 9)))
    full = model.apply(params, ids)
    cache = model.init_cache(2, 12)
    assert set(cache) == {"index", "mask", "layers"}
    assert set(cache["layers"]) == {"0", "1"}
    with pytest.raises(JloraError, match="n_positions"):
        model.init_cache(1, TINY["n_positions"] + 1)
    step = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))
    logits, cache = step(params, ids[:, :5], cache)  # prefill
    outs = [logits]
    for i in range(5, 9):
        logits, cache = step(params, ids[:, i : i + 1], cache)
        outs.append(logits)
    assert int(cache["index"]) == 9
    assert step._cache_size() == 2  # prefill + one decode shape
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_kv_cache_left_padded_decode(tiny):
    _, path = tiny
    model, params, _ = load(path)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, TINY["vocab_size"], (2, 8)))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    pos = jnp.clip(jnp.cumsum(mask, -1) - 1, 0)
    full = model.apply(params, ids, mask, pos)
    step = jax.jit(model.apply)
    logits, cache = step(params, ids[:, :4], mask[:, :4], pos[:, :4], model.init_cache(2, 8))
    outs = [logits]
    for i in range(4, 8):
        logits, cache = step(params, ids[:, i : i + 1], None, pos[:, i : i + 1], cache)
        outs.append(logits)
    np.testing.assert_array_equal(cache["mask"], mask > 0)
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[keep], np.asarray(full)[keep], atol=1e-5)


def test_bf16_and_dropout():
    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    ids = jnp.zeros((1, 4), jnp.int32)
    model = GPT2LMHeadModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    apply = jax.jit(model.apply, static_argnames="deterministic")
    assert apply(params, ids).dtype == jnp.bfloat16
    dropped = apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped.astype(jnp.float32), apply(params, ids).astype(jnp.float32))


def test_greedy_generate_equals_transformers(tmp_path):
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        hf.transformer.ln_f.weight.mul_(8.0)
    hf.save_pretrained(tmp_path)
    model, params, _ = load(tmp_path)
    rng = np.random.default_rng(3)
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids = np.where(mask == 1, rng.integers(1, TINY["vocab_size"], (3, 6)), 0)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    out = generate(model.apply, params, ids, mask, init_cache=model.init_cache, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_lora_forward_merge_and_save_merged(tiny, tmp_path):
    _, path = tiny
    model, params, hf_config = load(path)
    config = jlora.LoraConfig(rank=2, alpha=4, targets=list(SPEC.fan_in_fan_out), init="random")
    adapted = jlora.inject(params, config, jax.random.key(0))
    adapted = jax.tree_util.tree_map_with_path(  # non-zero B: the adapters change the output
        lambda kp, x: x + 0.1 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    ids = jnp.asarray(np.arange(14).reshape(2, 7) % TINY["vocab_size"])
    with_lora = jlora.lora(model.apply)(adapted, ids)
    merged = jlora.merge(adapted, unload=True)
    np.testing.assert_allclose(with_lora, model.apply(merged, ids), atol=1e-5)
    assert not np.allclose(with_lora, model.apply(params, ids), atol=1e-3)
    save_merged(model, merged, hf_config, tmp_path / "merged")
    back = getattr(transformers, SPEC.auto_class).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref = back(torch.tensor(np.asarray(ids))).logits.numpy()
    assert np.abs(np.asarray(with_lora) - ref).max() <= 1e-4


def test_peft_export_runs_in_peft(tiny, tmp_path):
    """Conv1D targets export with fan_in_fan_out; PeftModel gives jlora's logits."""
    import peft

    hf, path = tiny
    model, params, hf_config = load(path)
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["c_attn", "c_fc"], init="random")
    adapted = jlora.inject(params, config, jax.random.key(0))
    adapted = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.1 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    ids = jnp.asarray(np.arange(14).reshape(2, 7) % TINY["vocab_size"])
    out = jlora.lora(model.apply)(adapted, ids)
    save_peft(adapted, config, tmp_path, hf_config=hf_config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"]
    base = getattr(transformers, SPEC.auto_class).from_pretrained(path).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(np.asarray(ids))).logits.numpy()
    assert np.abs(np.asarray(out) - ref).max() <= 1e-4
