"""Fidelity: 20 steps of jlora's train step and of a peft + torch AdamW loop on a tiny
Llama, from the same adapters and batches, give the same losses."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import jlora
import jlora.train as T

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS, LR, WD = 20, 1e-3, 0.01
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.slow
def test_jlora_train_step_matches_peft_adamw(tiny_llama):
    from jlora.hf.load import load

    model, params, hf_config = load(tiny_llama)
    config = jlora.LoraConfig(rank=4, alpha=8, targets=TARGETS, init="random")
    params = jlora.inject(params, config, jax.random.key(0))
    ds = T.SyntheticTokens(96, 16, 4, seed=1, min_len=11)

    # jlora: the sharded-step code path on one device
    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
    state, frozen, sh = T.init(params, tx, jax.random.key(1))
    step = T.make_train_step(T.causal_lm_loss(model.apply), tx, sh)
    ours = []
    for i in range(STEPS):
        state, m = step(state, frozen, T.shard_batch(ds.batch(i), sh.batch))
        ours.append(float(m["loss"]))

    # peft + torch AdamW from the same adapters, exported with jlora.hf.peft.save_peft
    from jlora.hf.peft import save_peft

    adapter_dir = save_peft(params, config, tiny_llama / "adapter", hf_config=hf_config)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    a = params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"]
    loaded = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    np.testing.assert_array_equal(loaded.detach().numpy(), np.asarray(a).T)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    theirs = []
    pm.train()
    for i in range(STEPS):
        b = ds.batch(i)
        ids = torch.from_numpy(b["input_ids"]).long()
        mask = torch.from_numpy(b["attention_mask"]).long()
        labels = ids.masked_fill(mask == 0, -100)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(float(loss.detach()))

    errs = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    print(f"\nlosses jlora {ours[0]:.5f} -> {ours[-1]:.5f}, peft {theirs[0]:.5f} -> "
          f"{theirs[-1]:.5f}; max rel diff over {STEPS} steps {max(errs):.2e}")
    assert ours[-1] < ours[0] - 1e-3  # it trained
    assert max(errs) <= 1e-4
