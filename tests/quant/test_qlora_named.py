"""Named adapters on an NF4 base: selection and a mixed-adapter batch over quantized kernels
equal the same adapters over the dequantized base."""

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.llama import DecoderConfig, LlamaForCausalLM


def test_named_and_mixed_adapters_on_an_nf4_base():
    cfg = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rms_norm_eps=1e-6,
                        rope_inv_freq=tuple(10.0 ** -i for i in range(8)))
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (3, 10), 0, 64)
    q = jlora.quantize(model.init(jax.random.key(1), ids))
    p = jlora.inject(q, jlora.LoraConfig(rank=4, targets=["q_proj", "up_proj"], init="random"),
                     jax.random.key(2))
    p = jlora.inject(p, jlora.LoraConfig(rank=2, targets=["v_proj", "up_proj"], init="random"),
                     jax.random.key(3), name="b")
    p = jax.tree_util.tree_map_with_path(  # B away from zero
        lambda kp, x: x + 0.1 if "_lora_b" in jax.tree_util.keystr(kp) else x, p,
        is_leaf=jlora.quant.is_quantized)
    full = jlora.dequantize(p)
    route = jnp.array([1, -1, 0])
    for adapter in ("b", ("default", "b"), None, route):
        got = jlora.lora(model.apply, adapter=adapter)(p, ids)
        want = jlora.lora(model.apply, adapter=adapter)(full, ids)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    base = jlora.lora(model.apply, adapter=None)(p, ids)
    mixed = jlora.lora(model.apply, adapter=route)(p, ids)
    assert float(jnp.abs(mixed[0] - base[0]).max()) > 1e-2
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-5)
