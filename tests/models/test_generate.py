"""KV-cache generation against transformers' generate and the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jlora
from jlora.errors import JloraError
from jlora.hf.load import load
from jlora.models.generate import generate, sample_logits

VOCAB = 53


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch_model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        torch_model.lm_head.weight.mul_(8.0)
    torch_model.save_pretrained(path)
    model, params, _ = load(path)
    return torch_model, model, params


def _prompts():
    rng = np.random.RandomState(3)
    ids = rng.randint(3, VOCAB, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def test_greedy_equals_transformers(tiny):
    torch_model, model, params = tiny
    ids, mask = _prompts()
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        ).numpy()
    out = generate(
        model.apply,
        params,
        ids,
        mask,
        init_cache=model.init_cache,
        max_new_tokens=7,
        eos_token_id=2,
        pad_token_id=0,
    )
    assert out.shape == (3, 6 + 7)
    np.testing.assert_array_equal(np.asarray(out)[:, : ref.shape[1]], ref)
    # one row, no padding, no mask
    one = generate(model.apply, params, ids[:1], init_cache=model.init_cache, max_new_tokens=7)
    np.testing.assert_array_equal(np.asarray(one)[0, : ref.shape[1]], ref[0])


def test_cached_decode_equals_full_forward(tiny):
    _, model, params = tiny
    ids, mask = _prompts()
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    full = model.apply(params, ids, attention_mask=mask, position_ids=pos)
    cache = model.init_cache(3, 10)
    step = jax.jit(model.apply)
    logits, cache = step(
        params, ids[:, :3], attention_mask=mask[:, :3], position_ids=pos[:, :3], cache=cache
    )
    parts = [logits]
    for t in range(3, 6):
        logits, cache = step(
            params,
            ids[:, t : t + 1],
            attention_mask=mask[:, t : t + 1],
            position_ids=pos[:, t : t + 1],
            cache=cache,
        )
        parts.append(logits)
    cached = jnp.concatenate(parts, axis=1)
    real = mask.astype(bool)
    assert np.abs(np.asarray(cached) - np.asarray(full))[real].max() <= 1e-5
    assert int(cache["index"]) == 6
    assert cache["layers"]["1"]["key"].shape == (3, 10, 2, 8)


def test_generate_with_adapters_equals_merged(tiny):
    _, model, params = tiny
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], init="random")
    adapted = jlora.inject(params, config, jax.random.key(0))
    adapted = jax.tree_util.tree_map_with_path(  # non-zero B: the adapters change the output
        lambda kp, x: x + 0.5 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    ids, mask = _prompts()
    kw = dict(init_cache=model.init_cache, max_new_tokens=5)
    with_lora = generate(jlora.lora(model.apply), adapted, ids, mask, **kw)
    merged = generate(model.apply, jlora.merge(adapted, unload=True), ids, mask, **kw)
    base = generate(model.apply, params, ids, mask, **kw)
    np.testing.assert_array_equal(with_lora, merged)
    assert not np.array_equal(with_lora, base)


def test_sampling(tiny):
    _, model, params = tiny
    ids, mask = _prompts()
    kw = dict(init_cache=model.init_cache, max_new_tokens=4)
    greedy = generate(model.apply, params, ids, mask, **kw)
    top1 = generate(
        model.apply, params, ids, mask, do_sample=True, rng=jax.random.key(0), top_k=1, **kw
    )
    np.testing.assert_array_equal(greedy, top1)
    a = generate(model.apply, params, ids, mask, do_sample=True, rng=jax.random.key(1), **kw)
    b = generate(model.apply, params, ids, mask, do_sample=True, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    hot = generate(
        model.apply, params, ids, mask, do_sample=True, rng=jax.random.key(1),
        temperature=0.7, top_p=0.9, **kw,
    )  # fmt: skip
    assert hot.shape == greedy.shape
    with pytest.raises(JloraError, match="rng"):
        generate(model.apply, params, ids, do_sample=True, **kw)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda **kw: {int(sample_logits(logits, k, **kw)[0]) for k in keys}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.75) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert draw(top_p=0.5) == {0}
    assert draw() == {0, 1, 2, 3}
