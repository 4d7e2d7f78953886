"""DoRA, modules_to_save and the bias modes with PyTorch peft, both ways.

jlora -> peft: each case trains a few steps in jlora (so B, the magnitudes, the copies and
the biases all move), exports without ``hf_config`` (the model type comes from the base
directory's config.json), and ``peft.PeftModel.from_pretrained`` must load it without any
warning and give jlora's outputs. peft -> jlora: peft makes the adapter
(``init_lora_weights=False``), its magnitudes, copies and trainable biases are perturbed
(peft starts a magnitude at the weight norm, where DoRA's rescale is the identity), and
``load_peft`` must give peft's outputs; the loaded tree re-exports to the same outputs in
peft, and merges to its unmerged forward.
"""

from __future__ import annotations

import copy
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf

import jlora
from jlora import paths as P
from jlora.hf.load import load
from jlora.hf.peft import PeftExportWarning, load_peft, save_peft

ATOL = 1e-4
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": (lambda: tf.LlamaConfig(**LLAMA, tie_word_embeddings=False),
              tf.AutoModelForCausalLM),
    "qwen2": (lambda: tf.Qwen2Config(**{**LLAMA, "num_key_value_heads": 1},
                                     tie_word_embeddings=False), tf.AutoModelForCausalLM),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2,
                                   n_head=4, bos_token_id=0, eos_token_id=0),
             tf.AutoModelForCausalLM),
    "bert": (lambda: tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48,
                                   max_position_embeddings=32), tf.AutoModel),
}

EXPORTS = {
    # name: (architecture, LoraConfig)
    "llama-dora": ("llama", jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_dora=True,
        rank_pattern={"down_proj": 2}, dropout=0.05)),
    "qwen2-dora-all-linear-bias": ("qwen2", jlora.LoraConfig(
        rank=4, alpha=6, targets="all-linear", use_dora=True, use_rslora=True,
        bias="lora_only")),
    "gpt2-dora-conv1d": ("gpt2", jlora.LoraConfig(
        rank=4, alpha=16, targets=["c_attn", "c_fc"], use_dora=True)),
    "llama-modules-to-save": ("llama", jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "k_proj"], modules_to_save=["lm_head", "norm"])),
    "gpt2-bias-all-modules-to-save": ("gpt2", jlora.LoraConfig(
        rank=4, alpha=8, targets=["c_attn", "c_proj"], bias="all",
        modules_to_save=["wpe"])),
    "bert-dora-bias-lora-only-pooler": ("bert", jlora.LoraConfig(
        rank=2, alpha=4, targets=["query", "value"], use_dora=True, bias="lora_only",
        modules_to_save=["pooler"])),
}

IMPORTS = {
    # name: (architecture, peft.LoraConfig kwargs)
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                    "up_proj"],
                                 use_dora=True, rank_pattern={"up_proj": 2},
                                 modules_to_save=["embed_tokens"])),
    "qwen2-modules-to-save-bias-all": ("qwen2", dict(
        r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], bias="all",
        modules_to_save=["lm_head", "norm"])),
    "gpt2-dora-bias-lora-only": ("gpt2", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        use_dora=True, bias="lora_only")),
    "bert-dora-pooler": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                      use_dora=True, modules_to_save=["pooler"])),
}


def _inputs(arch):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 61, (2, 9))
    mask = np.ones((2, 9), np.int64)
    if arch == "bert":
        mask[1, 6:] = 0
    return ids, mask


def _jlora_out(model, arch, params, ids, mask):
    """The outputs compared with peft's: logits, or BERT's hidden states and pooler."""
    out = jlora.lora(model.apply)(params, ids, mask) if arch == "bert" else \
        jlora.lora(model.apply)(params, ids)
    if arch == "bert":
        return jnp.concatenate([out.last_hidden_state, out.pooler_output[:, None]], axis=1)
    return out


def _torch_out(arch, pm, ids, mask):
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if arch == "bert":
        return torch.cat([out.last_hidden_state, out.pooler_output[:, None]], 1).numpy()
    return out.logits.numpy()


def _base_out(arch, base_dir, ids, mask):
    """The base model's outputs (a fresh transformers model: peft's disable_adapter keeps
    the trained biases of bias='all'/'lora_only', and warns so)."""
    hf = ARCHS[arch][1].from_pretrained(base_dir, attn_implementation="eager").eval()
    return _torch_out(arch, hf, ids, mask)


def _keep(arch, mask):
    """Rows compared: every token but BERT's padding (the pooler row is always kept)."""
    keep = mask.astype(bool)
    return np.concatenate([keep, np.ones((2, 1), bool)], axis=1) if arch == "bert" else keep


def _trained_leaves(params):
    """Every leaf training moves (A stays near its init; the others start where they must)."""
    return {p: np.asarray(x) for p, x in P.leaves_with_paths(params["params"])
            if p.endswith((P.B_SUFFIX, P.MAGNITUDE_SUFFIX, P.SAVED_SUFFIX))}


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def exported(request, tmp_path_factory, save_hf, train_adapters):
    name = request.param
    arch, config = EXPORTS[name]
    make, auto = ARCHS[arch]
    base_dir = tmp_path_factory.mktemp(f"{name}-base")
    save_hf(make(), base_dir, auto, attn_implementation="eager")
    model, base, _ = load(base_dir)
    ids, mask = _inputs(arch)
    trained, ours = train_adapters(base, config,
                                   lambda p: _jlora_out(model, arch, p, ids, mask))
    adapter_dir = save_peft(trained, config, tmp_path_factory.mktemp(name) / "adapter",
                            base_model_name_or_path=str(base_dir))
    return name, arch, base_dir, adapter_dir, config, base, trained, np.asarray(ours)


def test_export_trained_every_variant_leaf(exported):
    _, _, _, _, config, base, trained, _ = exported
    moved = _trained_leaves(trained)
    kinds = {p.rsplit("_lora_", 1)[-1] for p in moved}
    want = {"b"} | ({"magnitude"} if config.use_dora else set()) | (
        {"saved"} if config.modules_to_save or config.bias != "none" else set())
    assert kinds == want
    saved = P.params_of(base)
    for path, x in moved.items():
        if path.endswith(P.SAVED_SUFFIX):  # the copy moved away from the base param
            module, name = P.split_path(path)
            leaf = saved
            for k in module.split("."):
                leaf = leaf[k]
            assert np.abs(x - np.asarray(leaf[P.base_name(name)])).max() > 1e-4, path
        else:
            assert np.abs(x).max() > 1e-4, path


def test_peft_loads_the_export_silently_with_jlora_outputs(exported, peft_messages):
    name, arch, base_dir, adapter_dir, config, _, _, ours = exported
    d = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert d["use_dora"] is config.use_dora and d["bias"] == config.bias
    assert d["modules_to_save"] == (list(config.modules_to_save) if config.modules_to_save
                                    else None)
    assert d["fan_in_fan_out"] is (arch == "gpt2")
    assert d["task_type"] == ("FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM")
    auto = ARCHS[arch][1]
    hf = auto.from_pretrained(base_dir, attn_implementation="eager").eval()
    with peft_messages() as messages:
        pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    assert not messages
    ids, mask = _inputs(arch)
    ref = _torch_out(arch, pm, ids, mask)
    keep = _keep(arch, mask)
    diff = np.abs(ours[keep] - ref[keep]).max()
    print(f"{name}: max |jlora - peft| = {diff:.2e} (max |out| {np.abs(ref).max():.3g})")
    assert diff <= ATOL
    base = _base_out(arch, base_dir, ids, mask)  # the adapter changes the outputs
    assert np.abs(base[keep] - ref[keep]).max() > 100 * ATOL


@pytest.mark.parametrize("exported", ["gpt2-dora-conv1d"], indirect=True)
def test_the_silence_is_not_vacuous(exported, peft_messages, tmp_path):
    """The capture does catch peft's warnings: the same export with fan_in_fan_out=false
    (what save_peft wrote when it could not know the model type) makes peft warn."""
    _, arch, base_dir, adapter_dir, *_ = exported
    (tmp_path / "a").mkdir()
    for f in adapter_dir.iterdir():
        (tmp_path / "a" / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "a" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "fan_in_fan_out": False}))
    hf = ARCHS[arch][1].from_pretrained(base_dir, attn_implementation="eager").eval()
    with peft_messages() as messages:
        peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    assert any("fan_in_fan_out" in m for m in messages), messages


def test_export_reimports_to_the_same_tree(exported):
    *_, adapter_dir, config, base, trained, _ = exported
    back, config2 = load_peft(base, adapter_dir)
    if config.targets == "all-linear":
        assert config2.targets == tuple(sorted({P.split_path(p)[0] for p in _trained_leaves(
            trained) if p.endswith(P.B_SUFFIX)}))
        config2 = jlora.LoraConfig(**{**vars(config2), "targets": config.targets})
    assert config2 == config
    assert jax.tree.structure(back) == jax.tree.structure(trained)
    for (p, a), (_, b) in zip(P.leaves_with_paths(back), P.leaves_with_paths(trained)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7,
                                   err_msg=p)


@pytest.fixture(scope="module", params=sorted(IMPORTS))
def from_torch(request, tmp_path_factory, save_hf):
    name = request.param
    arch, kwargs = IMPORTS[name]
    make, auto = ARCHS[arch]
    base_dir = tmp_path_factory.mktemp(f"{name}-base")
    hf = save_hf(make(), base_dir, auto, attn_implementation="eager")
    pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:  # away from the weight norm: a real rescale
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.requires_grad and "lora_" not in n:  # copies and trainable biases
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    adapter_dir = tmp_path_factory.mktemp(name)
    pm.save_pretrained(adapter_dir)
    ids, mask = _inputs(arch)
    return name, arch, base_dir, adapter_dir, kwargs, pm, _torch_out(arch, pm, ids, mask)


def test_jlora_runs_a_peft_adapter_with_peft_outputs(from_torch, tmp_path, peft_messages):
    name, arch, base_dir, adapter_dir, kwargs, pm, ref = from_torch
    model, base, hf_config = load(base_dir)
    params, config = load_peft(base, adapter_dir, hf_config=hf_config)
    assert config.use_dora is kwargs.get("use_dora", False)
    assert config.bias == kwargs.get("bias", "none")
    ids, mask = _inputs(arch)
    out = np.asarray(jax.jit(lambda p: _jlora_out(model, arch, p, ids, mask))(params))
    keep = _keep(arch, mask)
    diff = np.abs(out[keep] - ref[keep]).max()
    print(f"{name}: max |jlora - peft| = {diff:.2e} (max |out| {np.abs(ref).max():.3g})")
    assert diff <= ATOL
    plain = _base_out(arch, base_dir, ids, mask)  # the adapter changes the outputs
    assert np.abs(plain[keep] - ref[keep]).max() > 100 * ATOL
    # merge equals the unmerged forward
    merged = jlora.merge(params, unload=True)
    fwd = model.apply(merged, ids, mask) if arch == "bert" else model.apply(merged, ids)
    if arch == "bert":
        fwd = jnp.concatenate([fwd.last_hidden_state, fwd.pooler_output[:, None]], axis=1)
    np.testing.assert_allclose(np.asarray(fwd)[keep], out[keep], atol=ATOL)
    # and jlora's re-export loads in peft silently, with the same outputs
    again = save_peft(params, config, tmp_path / "again", base_model_name_or_path=str(base_dir))
    hf = ARCHS[arch][1].from_pretrained(base_dir, attn_implementation="eager").eval()
    with peft_messages() as messages:
        pm2 = peft.PeftModel.from_pretrained(hf, again).eval()
    assert not messages
    np.testing.assert_allclose(_torch_out(arch, pm2, ids, mask)[keep], ref[keep], atol=ATOL)


@pytest.mark.parametrize("from_torch", ["gpt2-dora-bias-lora-only"], indirect=True)
def test_merged_dora_kernel_is_peft_merged_weight(from_torch):
    """GPT-2's Conv1D stores (in, out) as jlora does: PEFT's merged weight (fan_in_fan_out)
    is jlora's merged kernel as it is."""
    _, _, base_dir, adapter_dir, _, pm, _ = from_torch
    _, base, _ = load(base_dir)
    params, _ = load_peft(base, adapter_dir)
    merged = jlora.merge(params, unload=True)["params"]
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()
    for layer in ("0", "1"):
        for module in ("attn.c_attn", "attn.c_proj"):
            ours = merged["transformer"]["h"][layer]
            for k in module.split("."):
                ours = ours[k]
            key = f"transformer.h.{layer}.{module}"
            np.testing.assert_allclose(np.asarray(ours["kernel"]),
                                       theirs[f"{key}.weight"].numpy(), atol=1e-5)
            np.testing.assert_allclose(np.asarray(ours["bias"]), theirs[f"{key}.bias"].numpy(),
                                       atol=1e-6)


def test_export_warns_when_the_base_model_type_is_unknown(tmp_path):
    base = {"params": {"q": {"kernel": jnp.ones((4, 6))}}}
    cfg = jlora.LoraConfig(rank=2, targets=["q"])
    p = jlora.inject(base, cfg, jax.random.key(0))
    with pytest.warns(PeftExportWarning, match=r"'org/model' is not a local directory with a "
                                               r"config.json.*no task_type and fan_in_fan_out"):
        save_peft(p, cfg, tmp_path / "a", base_model_name_or_path="org/model")
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.warns(PeftExportWarning, match="'t5' model, which jlora has no layout for"):
        save_peft(p, cfg, tmp_path / "b", base_model_name_or_path=str(tmp_path / "custom"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no base model named
        save_peft(p, cfg, tmp_path / "c")
        save_peft(p, cfg, tmp_path / "d", base_model_name_or_path="org/model",
                  model_type="llama")
