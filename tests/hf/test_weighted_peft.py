"""add_weighted_adapter against peft 0.21: for every combination type without randomness the
new adapter's ΔW equals peft's on the same two adapters; the DARE types match peft's in
distribution (the fraction kept and the expected value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from peft.utils import merge_utils

import jlora
from jlora.hf.load import load
from jlora.hf.peft import load_peft
from jlora.weighted import combine_tensors

SAME = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
SAME_B = dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
              use_rslora=True)
MIXED_B = dict(r=2, lora_alpha=6, target_modules=["k_proj", "v_proj"])
WEIGHTS = [0.7, -0.4]
DETERMINISTIC = ["linear", "ties", "magnitude_prune", "cat", "svd", "ties_svd",
                 "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(peft model, jlora tree) pairs holding the same adapters 'default' and 'b': equal
    ranks and targets, and mixed ones."""
    base = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    _, params, _ = load(base)
    out = {}
    for case, second in (("same", SAME_B), ("mixed", MIXED_B)):
        model = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(**SAME, init_lora_weights=False))
        model.add_adapter("b", peft.LoraConfig(**second, init_lora_weights=False))
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        p, _ = load_peft(params, path)
        p, _ = load_peft(p, path, name="b")
        out[case] = model, p
    return out


def _peft_deltas(model, name):
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and name in mod.lora_A:
            with torch.no_grad():
                out[path.removeprefix("base_model.model.")] = mod.get_delta_weight(name).numpy()
    return out


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_combined_delta_equals_peft(models, kind):
    case = "same" if kind in ("linear", "ties", "magnitude_prune") else "mixed"
    model, p = models[case]
    name = f"c_{kind}"
    model.base_model.add_weighted_adapter(["default", "b"], WEIGHTS, name,
                                          combination_type=kind, density=0.5)
    q = jlora.add_weighted_adapter(p, ["default", "b"], WEIGHTS, name, combination_type=kind,
                                   density=0.5)
    want = _peft_deltas(model, name)
    got = {k.removesuffix(f".kernel@{name}"): v for k, v in jlora.delta(q).items()
           if k.endswith(f"@{name}")}
    assert sorted(got) == sorted(want) and want
    for module, w in want.items():
        g = np.asarray(got[module]).T
        scale = np.abs(w).max()
        assert scale > 1e-3, module  # not vacuous
        np.testing.assert_allclose(g, w, atol=1e-5 * scale, err_msg=f"{kind} {module}")
    # the new adapter's rank and scale follow peft's config for it
    cfg = model.peft_config[name]
    leaves = q["params"]["model"]["layers"]["0"]["self_attn"]["v_proj"]
    assert leaves[f"kernel_lora_a@{name}"].shape[-1] == cfg.r
    assert float(leaves[f"kernel_lora_scale@{name}"]) == cfg.lora_alpha / cfg.r == 1.0


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_in_distribution(kind):
    """Same tensors through peft's and jlora's DARE, 400 draws each: the same fraction kept
    and the same mean per element, within sampling error."""
    rng = np.random.RandomState(0)
    tensors = [rng.randn(6, 8).astype(np.float32) for _ in range(2)]
    weights, density, draws = [0.7, 0.5], 0.3, 400
    fn = getattr(merge_utils, kind)
    torch.manual_seed(0)
    ref = np.stack([fn([torch.tensor(t) for t in tensors], torch.tensor(weights), density)
                    .numpy() for _ in range(draws)])
    keys = jax.random.split(jax.random.key(0), draws)
    ours = np.asarray(jax.vmap(lambda k: combine_tensors(
        [jnp.asarray(t) for t in tensors], weights, kind, density=density, key=k))(keys))
    # fraction of elements left nonzero: 1 - (1 - d)^2 for two independent masks
    kept = 1 - (1 - density) ** 2
    for sample in (ref, ours):
        assert abs((sample != 0).mean() - kept) < 0.02
    se = np.sqrt(ref.var(0) / draws + ours.var(0) / draws) + 1e-6
    z = np.abs(ref.mean(0) - ours.mean(0)) / se
    assert np.mean(z < 3.5) > 0.97, z.max()
    if kind == "dare_linear":  # unbiased: the mean is the weighted sum
        want = weights[0] * tensors[0] + weights[1] * tensors[1]
        assert np.mean(np.abs(ours.mean(0) - want) / (ours.std(0) / np.sqrt(draws) + 1e-6)
                       < 3.5) > 0.97


def test_dare_adapter_is_random_but_reproducible(models):
    _, p = models["same"]
    kw = dict(combination_type="dare_linear", density=0.5)
    one = jlora.add_weighted_adapter(p, ["default", "b"], WEIGHTS, "d", key=jax.random.key(1),
                                     **kw)
    two = jlora.add_weighted_adapter(p, ["default", "b"], WEIGHTS, "d", key=jax.random.key(1),
                                     **kw)
    other = jlora.add_weighted_adapter(p, ["default", "b"], WEIGHTS, "d",
                                       key=jax.random.key(2), **kw)
    d1, d2, d3 = (jlora.delta(x)["model.layers.0.self_attn.q_proj.kernel@d"]
                  for x in (one, two, other))
    np.testing.assert_array_equal(d1, d2)
    assert not np.array_equal(d1, d3)
