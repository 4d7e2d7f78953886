"""Training with the core: optimizer partition, split/combine, LoRA+, dropout, forward modes,
and the compiled cost of a LoRA step against full fine-tuning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.errors import ConfigError, NotInjectedError, UnconsumedAdapterError


class Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="input_layernorm")(x)
        q, k, v = (nn.Dense(self.d, name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(self.d), axis=-1)
        x = x + nn.Dense(self.d, name="o_proj")(att @ v)
        h = nn.LayerNorm(name="post_attention_layernorm")(x)
        up = nn.Dense(4 * self.d, name="up_proj")(h)
        return x + nn.Dense(self.d, name="down_proj")(jax.nn.gelu(up))


class TinyLM(nn.Module):
    """Transformer-shaped: embeddings, attention + MLP blocks, an untied output head."""

    d: int = 32
    layers: int = 2
    vocab: int = 64

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, name="embed_tokens")(ids)
        for i in range(self.layers):
            x = Block(self.d, name=f"layer_{i}")(x)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="norm")(x))


def _lm_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _setup(d=32, layers=2, vocab=64, shape=(2, 8), rank=4):
    model = TinyLM(d, layers, vocab)
    ids = jax.random.randint(jax.random.key(3), shape, 0, vocab)
    variables = model.init(jax.random.key(0), ids)
    cfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets="all-linear")
    return model, ids, variables, jlora.inject(variables, cfg, jax.random.key(1))


def test_split_path_trains_and_matches_full_tree_path():
    model, ids, _, p = _setup()
    fwd = jlora.lora(model.apply)
    tx = optax.adam(1e-2)

    # (1) whole tree: grads for everything, the partition zeroes the frozen ones
    opt = jlora.optimizer(tx, p)
    st = opt.init(p)
    # (2) split: differentiate only the adapters
    trainable, frozen = jlora.split(p)
    opt2 = jlora.optimizer(tx, trainable)
    st2 = opt2.init(trainable)
    assert len(jax.tree.leaves(st2)) == len(jax.tree.leaves(st))  # no state for frozen leaves

    @jax.jit
    def step_full(p, st):
        loss, g = jax.value_and_grad(lambda q: _lm_loss(fwd(q, ids), ids))(p)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, loss

    @jax.jit
    def step_split(t, st):
        loss, g = jax.value_and_grad(lambda t: _lm_loss(fwd(jlora.combine(t, frozen), ids), ids))(t)
        u, st = opt2.update(g, st, t)
        return optax.apply_updates(t, u), st, loss

    losses, losses2, t = [], [], trainable
    for _ in range(5):
        p, st, loss = step_full(p, st)
        t, st2, loss2 = step_split(t, st2)
        losses.append(float(loss))
        losses2.append(float(loss2))
    np.testing.assert_allclose(losses, losses2, rtol=1e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 p, jlora.combine(t, frozen))  # same math, differently fused graphs


def test_optimizer_keeps_no_state_for_frozen_leaves():
    _, _, _, p = _setup()
    st = jlora.optimizer(optax.adam(1e-3), p).init(p)
    n_state = sum(x.size for x in jax.tree.leaves(st) if x.ndim > 0)
    n_adapter = jlora.summary(p).trainable
    assert n_state == 2 * n_adapter  # Adam's mu and nu, for adapters only


def test_lora_plus_scales_b_updates():
    _, _, _, p = _setup()
    g = jax.tree.map(jnp.ones_like, p)
    ref, _ = jlora.optimizer(optax.sgd(0.1), p).update(g, jlora.optimizer(optax.sgd(0.1), p).init(p), p)
    tx = jlora.optimizer(optax.sgd(0.1), p, lora_plus_ratio=16)
    u, _ = tx.update(g, tx.init(p), p)
    q = u["params"]["layer_0"]["q_proj"]
    qr = ref["params"]["layer_0"]["q_proj"]
    np.testing.assert_allclose(q["kernel_lora_b"], 16 * qr["kernel_lora_b"])
    np.testing.assert_allclose(q["kernel_lora_a"], qr["kernel_lora_a"])
    assert float(jnp.abs(q["kernel"]).max()) == 0.0
    with pytest.raises(ConfigError, match="lora_plus_ratio"):
        jlora.optimizer(optax.sgd(0.1), p, lora_plus_ratio=0)


def test_optimizer_and_merge_need_adapters():
    _, _, variables, _ = _setup()
    with pytest.raises(NotInjectedError, match="inject"):
        jlora.optimizer(optax.sgd(0.1), variables)
    with pytest.raises(NotInjectedError, match="inject"):
        jlora.merge(variables)


def test_dropout_needs_rng_and_changes_only_training():
    model, ids, _, p = _setup()
    p = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 else x, p)  # non-zero B
    fwd = jlora.lora(model.apply, dropout=0.5)
    np.testing.assert_array_equal(fwd(p, ids), jlora.lora(model.apply)(p, ids))  # eval: no rng
    y1 = fwd(p, ids, rngs={"dropout": jax.random.key(0)})
    y2 = fwd(p, ids, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(y1, y2)
    with pytest.raises(ConfigError, match="dropout"):
        jlora.lora(model.apply, dropout=1.0)
    with pytest.raises(ConfigError, match="mode"):
        jlora.lora(model.apply, mode="fast")
    with pytest.raises(ConfigError, match="on_unconsumed"):
        jlora.lora(model.apply, on_unconsumed="ignore")


class Custom(nn.Module):
    """A layer that reads its kernel with self.param: no supported layer consumes its adapter."""

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3))
        return nn.Dense(3, name="dense")(x @ k)


def test_unconsumed_adapter_is_merged_on_read_or_raises():
    m, x = Custom(), jnp.ones((2, 4))
    p = jlora.inject(m.init(jax.random.key(0), x), jlora.LoraConfig(rank=2, targets=".*", init="random"),
                     jax.random.key(1))
    y = jlora.lora(m.apply)(p, x)
    np.testing.assert_allclose(y, m.apply(jlora.merge(p), x), rtol=1e-5)
    assert not np.allclose(y, m.apply(p, x))  # plain apply would ignore the adapters
    with pytest.raises(UnconsumedAdapterError, match="<root>"):
        jlora.lora(m.apply, on_unconsumed="raise")(p, x)


def test_delta_is_scaled_product():
    _, _, _, p = _setup()
    p = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 else x, p)
    d = jlora.delta(p)
    q = p["params"]["layer_1"]["q_proj"]
    np.testing.assert_allclose(d["layer_1.q_proj.kernel"],
                               q["kernel_lora_a"] @ q["kernel_lora_b"] * q["kernel_lora_scale"], rtol=1e-6)
    assert "lm_head.kernel" not in d  # all-linear leaves out the output head


@pytest.mark.slow
def test_compiled_cost_of_lora_step_vs_full_fine_tuning():
    """LoRA train step (grad of adapters + AdamW) <= 0.70x the FLOPs of full fine-tuning, and
    its persistent bytes (args + outputs - aliased) <= frozen + 4 x adapters + batch (+1%)."""
    model, ids, variables, p = _setup(d=512, layers=2, vocab=1024, shape=(4, 64), rank=8)
    fwd = jlora.lora(model.apply)
    tx = optax.adamw(1e-3)
    trainable, frozen = jlora.split(p)
    ltx = jlora.optimizer(tx, trainable)

    def lora_step(t, st, frozen, ids):
        loss, g = jax.value_and_grad(lambda t: _lm_loss(fwd(jlora.combine(t, frozen), ids), ids))(t)
        u, st = ltx.update(g, st, t)
        return optax.apply_updates(t, u), st, loss

    def full_step(q, st, ids):
        loss, g = jax.value_and_grad(lambda q: _lm_loss(model.apply(q, ids), ids))(q)
        u, st = tx.update(g, st, q)
        return optax.apply_updates(q, u), st, loss

    lora_c = jax.jit(lora_step, donate_argnums=(0, 1)).lower(trainable, ltx.init(trainable), frozen, ids).compile()
    full_c = jax.jit(full_step, donate_argnums=(0, 1)).lower(variables, tx.init(variables), ids).compile()
    ratio = lora_c.cost_analysis()["flops"] / full_c.cost_analysis()["flops"]
    assert ratio <= 0.70, ratio

    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    mem = lora_c.memory_analysis()
    persistent = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    bound = nbytes(frozen) + 4 * nbytes(trainable) + ids.nbytes
    assert persistent <= 1.01 * bound, (persistent, bound)
    # and no gradient or Adam moment for a frozen weight: the full step holds them all
    full_mem = full_c.memory_analysis()
    assert persistent < 0.5 * (full_mem.argument_size_in_bytes + full_mem.output_size_in_bytes
                               - full_mem.alias_size_in_bytes)


class Boxed(nn.Module):
    """Kernels carry logical axis names (nn.with_partitioning): params are Partitioned boxes."""

    @nn.compact
    def __call__(self, x):
        init = lambda names: nn.with_partitioning(nn.initializers.lecun_normal(), names)  # noqa: E731
        x = nn.Dense(16, kernel_init=init(("embed", "mlp")), name="q")(x)
        return nn.Dense(4, kernel_init=init(("mlp", "embed")), name="o")(x)


def test_boxed_params_run_merge_and_train():
    m, x = Boxed(), jnp.ones((2, 8))
    v = m.init(jax.random.key(0), x)
    p = jlora.inject(v, jlora.LoraConfig(rank=2, targets=["q", "o"], init="random"), jax.random.key(1))
    y = jlora.lora(m.apply, on_unconsumed="raise")(p, x)
    assert np.abs(np.asarray(y - m.apply(v, x))).max() > 1e-2
    np.testing.assert_allclose(m.apply(jlora.merge(p), x), y, rtol=1e-5, atol=1e-6)
    assert isinstance(jlora.merge(p)["params"]["q"]["kernel"], nn.Partitioned)
    tx = jlora.optimizer(optax.adam(1e-2), p)
    st = tx.init(p)
    g = jax.grad(lambda q: jnp.sum(jlora.lora(m.apply)(q, x) ** 2))(p)
    u, st = tx.update(g, st, p)
    new = optax.apply_updates(p, u)
    q0, q1 = p["params"]["q"], new["params"]["q"]
    np.testing.assert_array_equal(q0["kernel"].unbox(), q1["kernel"].unbox())
    assert not np.array_equal(q0["kernel_lora_a"].unbox(), q1["kernel_lora_a"].unbox())
    assert q1["kernel_lora_b"].names == (None, "mlp")
