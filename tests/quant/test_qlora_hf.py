"""A transformers + bitsandbytes 4-bit Llama: jlora loads it, matches its logits, and its
adapters trained in jlora load in peft on transformers' 4-bit model with the same logits."""

import json

import jax
import numpy as np
import pytest

import jlora
from jlora.errors import HFError
from jlora.quant import NF4

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

LLAMA = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
IDS = np.array([[3, 7, 1, 9, 4, 11], [5, 5, 2, 8, 30, 0]])
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


def _load_4bit(path, quantize=False):
    kw = {"quantization_config": tf.BitsAndBytesConfig(**BNB)} if quantize else {}
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    for m in model.modules():  # else the first CPU forward repacks and rounds scales to bf16
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


@pytest.fixture(scope="module")
def q4(tmp_path_factory, save_hf):
    root = tmp_path_factory.mktemp("qlora")
    save_hf(tf.LlamaConfig(**LLAMA), root / "fp")
    model = _load_4bit(root / "fp", quantize=True)
    model.save_pretrained(root / "q4")  # saved before any forward
    return root


def _logits(model, **kw):
    with torch.no_grad():
        return model(torch.tensor(IDS), **kw).logits.numpy()


def test_load_4bit_checkpoint_matches_transformers(q4):
    model, params, hf_config = jlora.hf.load(q4 / "q4")
    layer = params["params"]["model"]["layers"]["0"]
    assert isinstance(layer["self_attn"]["q_proj"]["kernel"], NF4)
    assert not isinstance(params["params"]["lm_head"]["kernel"], NF4)
    assert hf_config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ref = _logits(_load_4bit(q4 / "q4"))
    got = np.asarray(jlora.lora(model.apply)(params, IDS))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # quantizing the full-precision checkpoint while loading gives the same codes
    _, again, _ = jlora.hf.load(q4 / "fp", quantize=True)
    a = again["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    b = layer["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def _train(params, config, fwd, steps=3):
    """A few Adam steps of the adapters alone (split/combine: NF4 leaves are frozen)."""
    import jax.numpy as jnp
    import optax

    p = jlora.inject(params, config, jax.random.key(0))
    trainable, frozen = jlora.split(p)
    target = jax.random.normal(jax.random.key(1), fwd(p).shape)
    tx = optax.adam(1e-2)
    loss = lambda t: jnp.mean((fwd(jlora.combine(t, frozen)) - target) ** 2)  # noqa: E731

    @jax.jit
    def run(t):
        def step(_, c):
            t, s = c
            u, s = tx.update(jax.grad(loss)(t), s, t)
            return optax.apply_updates(t, u), s

        return jax.lax.fori_loop(0, steps, step, (t, tx.init(t)))[0]

    trained = jlora.combine(run(trainable), frozen)
    return trained, fwd(trained)


def test_adapters_trained_on_4bit_load_in_peft(q4, tmp_path):
    model, params, hf_config = jlora.hf.load(q4 / "q4")
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    fwd = lambda p: jlora.lora(model.apply)(p, IDS)  # noqa: E731
    trained, got = _train(params, config, fwd)
    b = trained["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_b"]
    assert float(abs(b).max()) > 0  # training moved B: the comparison is not vacuous
    out = jlora.hf.save_peft(trained, config, tmp_path / "adapter", hf_config=hf_config)
    base = _load_4bit(q4 / "q4")
    ref0 = _logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ref = _logits(peft_model)
    got = np.asarray(got)
    assert np.abs(ref - ref0).max() > 1e-3  # the adapters change the 4-bit model's logits
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_unsupported_4bit_checkpoints(q4, tmp_path):
    import shutil

    bad = tmp_path / "int8"
    shutil.copytree(q4 / "q4", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] |= {"bnb_4bit_quant_type": "int4"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="NF4 and FP4"):
        jlora.hf.load(bad)
    cfg["quantization_config"] |= {"load_in_4bit": False, "load_in_8bit": True,
                                   "bnb_4bit_quant_type": "nf4"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="8-bit"):
        jlora.hf.load(bad)
    # a 4-bit weight of another quant type in the safetensors
    from safetensors.numpy import load_file

    from jlora.hf.io import SINGLE_FILE, write_safetensors

    other = tmp_path / "int4"
    shutil.copytree(q4 / "q4", other)
    tensors = load_file(other / SINGLE_FILE)
    key = next(k for k in tensors if k.endswith("bitsandbytes__nf4"))
    tensors[key.replace("__nf4", "__int4")] = tensors.pop(key)
    write_safetensors(other / SINGLE_FILE, tensors)
    with pytest.raises(HFError, match="quant type 'int4'.*NF4 and FP4"):
        jlora.hf.load(other)


@pytest.mark.slow
@pytest.mark.parametrize("bnb_4bit", [False, True])
def test_save_merged_loads_in_transformers(q4, tmp_path, bnb_4bit):
    model, params, hf_config = jlora.hf.load(q4 / "q4")
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "up_proj"], init="random")
    p = jlora.inject(params, config, jax.random.key(3))
    out = jlora.hf.save_merged(model, p, hf_config, tmp_path / "merged", bnb_4bit=bnb_4bit)
    cfg = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in cfg) == bnb_4bit
    got = _load_4bit(out) if bnb_4bit else tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = _logits(got)
    if bnb_4bit:  # the merged kernels were quantized again: jlora's requantized tree
        want = jlora.lora(model.apply)(jlora.merge(p, unload=True, requantize=True), IDS)
        # the unadapted kernels are the checkpoint's own bytes
        _, back, _ = jlora.hf.load(out)
        a = back["params"]["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
        b = params["params"]["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    else:
        want = jlora.lora(model.apply)(p, IDS)
    want = np.asarray(want)
    assert np.abs(ref - want).max() <= 1e-4 * np.abs(want).max()
