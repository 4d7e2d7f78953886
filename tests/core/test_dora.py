"""DoRA in the core: the magnitude leaf, PEFT's forward (the weight norm detached), merge and
unmerge, trainability, the errors for layers DoRA does not adapt, and the compiled cost of a
DoRA train step against plain LoRA's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import paths as P
from jlora.errors import IncompleteAdapterError, LayoutError, ShapeError


class Mixed(nn.Module):
    """A Dense, a DenseGeneral with two output axes, and an Einsum whose output interleaves
    the kernel's output axes with the input's (b h t k): every geometry DoRA must lay its
    per-feature factor over."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="d")(x)
        x = nn.DenseGeneral((2, 4), axis=-1, name="g")(x)
        return nn.Einsum((2, 4, 3, 5), "btij,ijhk->bhtk", name="e")(x)


X = jax.random.normal(jax.random.key(0), (2, 7, 6))
MODEL = Mixed()
LAYOUT = jlora.layout(MODEL, X)


def _params(init="random", **kw):
    v = MODEL.init(jax.random.key(1), X)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["d", "g", "e"], use_dora=True, init=init,
                           **kw)
    return v, jlora.inject(v, cfg, jax.random.key(2), layout=LAYOUT)


def _perturb_magnitudes(p, factor=1.3):
    """Magnitudes away from the weight norm, so the rescale is not the identity."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x * factor if P.keypath_to_path(kp).endswith(P.MAGNITUDE_SUFFIX) else x, p)


def _reference(p, x):
    """PEFT's DoRA forward written out with jnp: m / ||W + s A B||_c (detached) times
    (x W + s x A B), plus the bias, layer by layer."""
    q = p["params"]

    def layer(name, x, eq, lay):
        leaves = q[name]
        w, a, b, s, m = (leaves[k] for k in ("kernel", "kernel_lora_a", "kernel_lora_b",
                                             "kernel_lora_scale", "kernel_lora_magnitude"))
        ab = jnp.tensordot(a, b, axes=1)
        v = w + s * ab
        n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=tuple(range(a.ndim - 1)))))
        return lay(m / n) * (jnp.einsum(eq, x, w) + s * jnp.einsum(eq, x, ab)) + \
            lay(leaves["bias"])

    x = layer("d", x, "bti,io->bto", lambda v: v)
    x = layer("g", x, "bti,ijk->btjk", lambda v: v)
    return layer("e", x, "btij,ijhk->bhtk", lambda v: v[None, :, None, :])


def test_magnitude_starts_as_the_weight_norm_and_the_model_is_unchanged():
    v, p = _params(init="default")  # B = 0: W + s A B = W
    for name, n_out in (("d", (8,)), ("g", (2, 4)), ("e", (3, 5))):
        leaves = p["params"][name]
        m = leaves["kernel_lora_magnitude"]
        assert m.shape == n_out and m.dtype == jnp.float32
        w = leaves["kernel"]
        n_in = w.ndim - len(n_out)
        np.testing.assert_allclose(m, jnp.sqrt(jnp.sum(w * w, axis=tuple(range(n_in)))),
                                   rtol=1e-6)
    np.testing.assert_allclose(jlora.lora(MODEL.apply)(p, X), MODEL.apply(v, X), atol=1e-5)


def test_forward_is_peft_dora_and_its_gradient_detaches_the_norm():
    _, p = _params()
    p = _perturb_magnitudes(p)
    fwd = jlora.lora(MODEL.apply, on_unconsumed="raise")
    y = fwd(p, X)
    np.testing.assert_allclose(y, _reference(p, X), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - MODEL.apply(p, X)).max()) > 0.1  # the adapters matter
    loss = lambda f: lambda q: jnp.sum(f(q, X) ** 2)  # noqa: E731
    g, g_ref = jax.grad(loss(fwd))(p), jax.grad(loss(_reference))(p)
    for name in ("d", "g", "e"):
        for leaf in ("kernel_lora_a", "kernel_lora_b", "kernel_lora_magnitude"):
            np.testing.assert_allclose(g["params"][name][leaf], g_ref["params"][name][leaf],
                                       rtol=2e-4, atol=1e-4)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores():
    _, p = _params()
    p = _perturb_magnitudes(p)
    y = jlora.lora(MODEL.apply)(p, X)
    merged = jlora.merge(p)
    assert merged["params"]["g"]["kernel_lora_norm"].shape == (2, 4)
    np.testing.assert_allclose(MODEL.apply(merged, X), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.lora(MODEL.apply)(merged, X), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(MODEL.apply(jlora.merge(p, unload=True), X), y, rtol=1e-5,
                               atol=1e-5)
    back = jlora.unmerge(merged)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    d = jlora.delta(p)  # what merge adds
    for name in ("d", "g", "e"):
        np.testing.assert_allclose(p["params"][name]["kernel"] + d[f"{name}.kernel"],
                                   merged["params"][name]["kernel"], atol=1e-6)


def test_dropout_takes_peft_path_on_the_dropped_input():
    """With dropout, PEFT recomputes the base on the dropped input: at a drop probability
    of 2**-16 the result is the no-dropout one within the rare dropped elements."""
    _, p = _params()
    p = _perturb_magnitudes(p)
    y = jlora.lora(MODEL.apply)(p, X)
    yd = jlora.lora(MODEL.apply, dropout=2.0**-16)(p, X, rngs={"dropout": jax.random.key(5)})
    assert float(jnp.abs(yd - y).max()) < 1e-3
    yd = jlora.lora(MODEL.apply, dropout=0.5)(p, X, rngs={"dropout": jax.random.key(5)})
    assert float(jnp.abs(yd - y).max()) > 1e-2  # the masks do apply


def test_magnitude_is_trained_and_frozen_leaves_stay():
    _, p = _params()
    lab = jlora.labels(p)["params"]["d"]
    assert lab["kernel_lora_magnitude"] == "trainable" and lab["kernel"] == "frozen"
    s = jlora.summary(p)
    mags = sum(int(np.size(p["params"][n]["kernel_lora_magnitude"])) for n in "dge")
    ab = sum(int(np.size(p["params"][n][k])) for n in "dge"
             for k in ("kernel_lora_a", "kernel_lora_b"))
    assert s.trainable == ab + mags
    tx = jlora.optimizer(optax.adam(1e-2), p)
    st = tx.init(p)
    g = jax.grad(lambda q: jnp.sum(jlora.lora(MODEL.apply)(q, X) ** 2))(p)
    new = optax.apply_updates(p, tx.update(g, st, p)[0])
    assert not np.array_equal(new["params"]["d"]["kernel_lora_magnitude"],
                              p["params"]["d"]["kernel_lora_magnitude"])
    assert np.array_equal(new["params"]["d"]["kernel"], p["params"]["d"]["kernel"])
    assert jlora.plan(MODEL.init(jax.random.key(1), X), jlora.LoraConfig(
        rank=2, alpha=4, targets=["d", "g", "e"], use_dora=True),
        layout=LAYOUT).adapter_params == ab + mags


class EmbedConv(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 6, name="emb")(ids)
        return nn.Conv(4, (3,), name="conv")(x)


def test_dora_refuses_embeddings_and_convolutions():
    ids = jnp.zeros((1, 5), jnp.int32)
    v = EmbedConv().init(jax.random.key(0), ids)
    lay = jlora.layout(EmbedConv(), ids)
    for target, kind in (("emb", "an Embed"), ("conv", "a Conv")):
        cfg = jlora.LoraConfig(rank=2, targets=[target], use_dora=True)
        with pytest.raises(LayoutError, match=f"{target}.*DoRA adapts Dense, DenseGeneral and "
                                              f"Einsum kernels only, not {kind}"):
            jlora.inject(v, cfg, jax.random.key(1), layout=lay)
    # a hand-made magnitude on an Embed is refused by the forward, never ignored
    p = jlora.inject(v, jlora.LoraConfig(rank=2, targets=["emb"]), jax.random.key(1))
    p["params"]["emb"]["embedding_lora_magnitude"] = jnp.ones((6,))
    with pytest.raises(LayoutError, match="emb: DoRA adapts Dense"):
        jlora.lora(EmbedConv().apply)(p, ids)


def test_dora_leaves_are_checked_for_wholeness():
    _, p = _params()
    merged = jlora.merge(p)
    del merged["params"]["d"]["kernel_lora_norm"]
    with pytest.raises(IncompleteAdapterError, match=r"d\.kernel is not whole: .*no "
                                                     r"kernel_lora_norm"):
        jlora.unmerge(merged)
    p["params"]["d"]["kernel_lora_norm"] = jnp.ones((8,))
    with pytest.raises(IncompleteAdapterError, match="which only a merged DoRA adapter has"):
        jlora.lora(MODEL.apply)(p, X)
    _, p = _params()
    p["params"]["g"]["kernel_lora_magnitude"] = jnp.ones((8,))
    with pytest.raises(ShapeError, match=r"kernel_lora_magnitude has shape \(8,\), not B's "
                                         r"output shape \(2, 4\)"):
        jlora.merge(p)
    assert P.check_adapters(_params()[1]["params"], "t")[("d", "kernel", "default")] == P.Adapter("dora",
                                                                                        False)


def test_magnitude_takes_the_kernels_output_sharding():
    from jax.sharding import PartitionSpec as PS

    mesh = jlora.train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, p = _params()
    rules = [(r"d\.kernel$", PS("fsdp", "tensor"))]
    specs = jlora.train.mesh.param_specs(p, mesh, rules)["params"]["d"]
    assert specs["kernel_lora_magnitude"] == PS("tensor")
    assert specs["kernel_lora_b"] == PS(None, "tensor")


class TinyLM(nn.Module):
    """Transformer-shaped: embeddings, attention + MLP blocks, an untied output head."""

    d: int
    layers: int
    vocab: int

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, name="embed_tokens")(ids)
        for i in range(self.layers):
            h = nn.LayerNorm(name=f"ln_{i}")(x)
            q, k, v = (nn.Dense(self.d, name=f"{n}_{i}")(h) for n in ("q", "k", "v"))
            att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(self.d), axis=-1)
            x = x + nn.Dense(self.d, name=f"o_{i}")(att @ v)
            up = nn.Dense(4 * self.d, name=f"up_{i}")(nn.LayerNorm(name=f"ln2_{i}")(x))
            x = x + nn.Dense(self.d, name=f"down_{i}")(jax.nn.gelu(up))
        return nn.Dense(self.vocab, name="lm_head")(x)


def _lm_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.mark.slow
def test_compiled_cost_of_a_dora_step_vs_lora():
    """The DoRA train step (forward, backward, AdamW) compiles to at most 1.15x the FLOPs of
    the plain LoRA step on a transformer-shaped model: the weight norm, W + s A B formed once
    per step without gradient, is the only extra matmul."""
    model = TinyLM(256, 2, 512)
    ids = jax.random.randint(jax.random.key(3), (4, 64), 0, 512)
    base = model.init(jax.random.key(0), ids)
    fwd = jlora.lora(model.apply)
    flops = {}
    for dora in (False, True):
        cfg = jlora.LoraConfig(rank=8, alpha=16, targets="all-linear", use_dora=dora)
        trainable, frozen = jlora.split(jlora.inject(base, cfg, jax.random.key(1)))
        tx = jlora.optimizer(optax.adamw(1e-3), trainable)

        def step(t, st, frozen, ids, tx=tx):
            loss, g = jax.value_and_grad(
                lambda t: _lm_loss(fwd(jlora.combine(t, frozen), ids), ids))(t)
            u, st = tx.update(g, st, t)
            return optax.apply_updates(t, u), st, loss

        compiled = jax.jit(step).lower(trainable, tx.init(trainable), frozen, ids).compile()
        flops[dora] = compiled.cost_analysis()["flops"]
    ratio = flops[True] / flops[False]
    print(f"DoRA / LoRA train-step FLOPs: {ratio:.4f}")
    assert 1.0 < ratio <= 1.15, ratio


def test_dora_and_copies_in_a_scanned_llama_equal_the_unscanned_and_the_merged():
    """jlora's Llama with ``scan_layers`` runs one traced block over the stacked params: the
    magnitudes and the copies (of every layer's input_layernorm) are stacked with them."""
    from jlora.models.llama import DecoderConfig, LlamaForCausalLM

    d = 8
    cfg = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=d, rms_norm_eps=1e-6,
                        rope_inv_freq=tuple(10000.0 ** (-i / d) for i in range(0, d, 2)))
    ids = jax.random.randint(jax.random.key(4), (2, 9), 0, 50)
    plain, scanned = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg, scan_layers=True)
    base = plain.init(jax.random.key(0), ids)
    config = jlora.LoraConfig(rank=4, targets="all-linear", use_dora=True,
                              modules_to_save=["input_layernorm"], init="random")
    p = jax.tree_util.tree_map_with_path(  # magnitudes and copies away from their init
        lambda kp, x: x * 1.3 if P.keypath_to_path(kp).endswith(
            (P.MAGNITUDE_SUFFIX, P.SAVED_SUFFIX)) else x,
        jlora.inject(base, config, jax.random.key(1)))
    y = jlora.lora(plain.apply, on_unconsumed="raise")(p, ids)
    assert float(jnp.abs(y - plain.apply(base, ids)).max()) > 0.1
    np.testing.assert_allclose(jlora.lora(scanned.apply, on_unconsumed="raise")(p, ids), y,
                               atol=1e-5)
    np.testing.assert_allclose(plain.apply(jlora.merge(p, unload=True), ids), y, atol=1e-5)
