"""NF4 leaves against bitsandbytes (codes, scales, dequantize) and quantize's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.errors import QuantizationError, TargetError
from jlora.quant import NF4, dequantize_leaf, quantize_array
from jlora.quant.nf4 import dynamic_map

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def _weight(out=384, inp=192, seed=0):
    w = (np.random.default_rng(seed).standard_normal((out, inp)) * 0.05).astype(np.float32)
    w[0, :64] = 0.0  # an all-zero block
    w[1, :64] = np.linspace(-1, 1, 64)  # values on code midpoints and ends
    return w  # PyTorch's (out, in); the linen kernel is w.T


def test_dynamic_map_is_bitsandbytes():
    assert np.array_equal(dynamic_map(), F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_and_scales_bit_for_bit(quant_type):
    w = _weight()
    packed, state = F.quantize_4bit(torch.tensor(w), blocksize=64, quant_type=quant_type,
                                    compress_statistics=False)
    q = quantize_array(jnp.asarray(w.T), double_quant=False, quant_type=quant_type)
    assert q.shape == (192, 384) and q.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(dequantize_leaf(q)).T,
                                  F.dequantize_4bit(packed, state).numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant(quant_type):
    w = _weight(seed=1)
    packed, state = F.quantize_4bit(torch.tensor(w), blocksize=64, quant_type=quant_type,
                                    compress_statistics=True)
    q = quantize_array(jnp.asarray(w.T), double_quant=True, quant_type=quant_type)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    steps = np.abs(np.asarray(q.absmax, int) - state.absmax.numpy().astype(int))
    assert steps.max() <= 1 and (steps > 0).mean() < 0.01  # the CPU 8-bit quantizer's quirk
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
    assert float(q.offset) == state.offset.item()
    # dequantizing bitsandbytes' own stored state is bit for bit
    theirs = NF4(jnp.asarray(packed.numpy().reshape(-1)), jnp.asarray(state.absmax.numpy()),
                 jnp.asarray(state.state2.absmax.numpy()), jnp.float32(state.offset.item()),
                 shape=q.shape, quant_type=quant_type)
    ref = F.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_leaf(theirs)).T, ref)
    # ours differs only in the blocks whose scale took the other 8-bit code
    diff = np.abs(np.asarray(dequantize_leaf(q)).T - ref).reshape(-1, 64).max(1)
    np.testing.assert_array_equal(diff > 0, steps > 0)


def test_tree_quantize_targets_and_frozen_walkers():
    k = jnp.asarray(_weight(64, 128).T)
    params = {"params": {"q_proj": {"kernel": k, "bias": jnp.zeros(64)},
                         "embed": {"embedding": jnp.ones((10, 64))},
                         "norm": {"scale": jnp.ones(64)}, "lm_head": {"kernel": k}}}
    q = jlora.quantize(params)
    assert isinstance(q["params"]["q_proj"]["kernel"], NF4)
    assert q["params"]["lm_head"]["kernel"] is k and q["params"]["q_proj"]["bias"] is not None
    only = jlora.quantize(params, ["lm_head"], double_quant=False)
    assert isinstance(only["params"]["lm_head"]["kernel"], NF4)
    assert only["params"]["lm_head"]["kernel"].absmax.dtype == jnp.float32
    p = jlora.inject(q, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    trainable, frozen = jlora.split(p)
    assert trainable["params"]["q_proj"]["kernel"] is None
    assert isinstance(frozen["params"]["q_proj"]["kernel"], NF4)
    assert jlora.labels(p)["params"]["q_proj"]["kernel"] == "frozen"
    assert jlora.summary(p).total == jlora.summary(jlora.dequantize(p)).total
    full = jlora.dequantize(q)["params"]["q_proj"]["kernel"]
    assert full.shape == k.shape and float(jnp.abs(full - k).max()) < 0.16  # half a code step


def test_errors():
    with pytest.raises(QuantizationError, match="not a multiple of block_size=64"):
        jlora.quantize({"q": {"kernel": jnp.ones((10, 6))}}, ["q"])
    q = jlora.quantize({"q": {"kernel": jnp.ones((64, 2))}}, ["q"])
    with pytest.raises(QuantizationError, match="already quantized"):
        jlora.quantize(q, ["q"])
    with pytest.raises(QuantizationError, match="block_size"):
        jlora.quantize({"q": {"kernel": jnp.ones((64, 2))}}, ["q"], block_size=48)
    with pytest.raises(QuantizationError, match="quant_type"):
        jlora.quantize({"q": {"kernel": jnp.ones((64, 2))}}, ["q"], quant_type="int4")
    with pytest.raises(TargetError, match="match no module"):
        jlora.quantize({"q": {"kernel": jnp.ones((64, 2))}}, ["v"])


def test_grads_for_an_nf4_leaf_are_an_error():
    import flax.linen as nn

    model = nn.Dense(4)
    x = jnp.ones((2, 64))
    q = jlora.quantize(model.init(jax.random.key(0), x), ".*")
    p = jlora.inject(q, jlora.LoraConfig(rank=2, targets=".*"), jax.random.key(1))
    loss = lambda p: jlora.lora(model.apply)(p, x).sum()  # noqa: E731
    with pytest.raises(QuantizationError, match="gradients were requested for a quantized"):
        jax.grad(loss, allow_int=True)(p)
    trainable, frozen = jlora.split(p)  # the adapters alone: fine
    g = jax.grad(lambda t: loss(jlora.combine(t, frozen)))(trainable)
    assert g["params"]["kernel_lora_b"].shape == (2, 4)


def test_inits_that_rewrite_the_kernel_refuse_nf4():
    q = jlora.quantize({"q": {"kernel": jnp.ones((64, 8))}}, ["q"])
    with pytest.raises(jlora.errors.ConfigError, match="quantized"):
        jlora.inject(q, jlora.LoraConfig(rank=2, targets=["q"], init="pissa"), jax.random.key(0))


def test_dora_on_nf4_matches_the_dequantized_model():
    import flax.linen as nn

    model, x = nn.Dense(8), jnp.ones((2, 64))
    q = jlora.quantize(model.init(jax.random.key(0), x), ".*")
    cfg = jlora.LoraConfig(rank=2, targets=".*", use_dora=True, init="random")
    p = jlora.inject(q, cfg, jax.random.key(1))
    y = jlora.lora(model.apply)(p, x)
    want = model.apply(jlora.merge(jlora.dequantize(p), unload=True), x)
    assert float(jnp.abs(y - want).max()) < 1e-4
    back = jlora.merge(p, unload=True, requantize=True)
    assert isinstance(back["params"]["kernel"], NF4)
