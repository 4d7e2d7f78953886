"""jlora.lora(graphdef): the NNX forward runs the adapters without forming ΔW, equals the
adapted network written out by hand from the State's leaves, the base at B = 0, and the
merged model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _nnx_model import TARGETS, ConvNet, TinyLM, adapted, perturb_b
from flax import nnx

import jlora
from jlora.errors import (
    ConfigError,
    KeyTypeError,
    LayoutError,
    NnxStateError,
    UnconsumedAdapterError,
)

IDS = jnp.array([[1, 5, 2, 7, 3, 0], [4, 4, 9, 1, 8, 2]])
CONFIG = jlora.LoraConfig(rank=2, alpha=4, targets=TARGETS)


def _v(state, *path):
    for k in path:
        state = state[k]
    return state.get_value()


def _adapted_w(state, *path, param="kernel"):
    """W + scale * A @ B of one layer, from the State's leaves (A's leading axes are inputs)."""
    w, a, b, s = (_v(state, *path, param + suffix)
                  for suffix in ("", "_lora_a", "_lora_b", "_lora_scale"))
    return w + s * jnp.tensordot(a, b, axes=1)


def _by_hand(state, ids):
    """The adapted TinyLM written out with plain jnp from the State's leaves."""
    emb = _adapted_w(state, "embed", param="embedding")
    x = emb[ids]
    for i in range(len(state["blocks"])):
        blk = ("blocks", i)
        qkv = jnp.einsum("btd,dchk->btchk", x, _adapted_w(state, *blk, "attn", "qkv")) + \
            _v(state, *blk, "attn", "qkv", "bias")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        t = x.shape[1]
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)
        x = x + jnp.einsum("bthk,hkd->btd", o, _adapted_w(state, *blk, "attn", "out")) + \
            _v(state, *blk, "attn", "out", "bias")
        h = jax.nn.gelu(x @ _adapted_w(state, *blk, "up") + _v(state, *blk, "up", "bias"))
        x = x + h @ _adapted_w(state, *blk, "down") + _v(state, *blk, "down", "bias")
    return x @ emb.T


@pytest.fixture(scope="module")
def lm():
    graphdef, base, state = adapted(TinyLM(), CONFIG)
    return graphdef, base, state, perturb_b(state)


def test_equals_the_adapted_network_computed_by_hand(lm):
    graphdef, _, _, state = lm
    out = jlora.lora(graphdef)(state, IDS)
    ref = _by_hand(state, IDS)
    assert float(jnp.abs(ref).max()) > 1.0
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_b_zero_equals_the_base_model_exactly(lm):
    graphdef, base, state, _ = lm
    assert np.array_equal(jlora.lora(graphdef)(state, IDS), nnx.merge(graphdef, base)(IDS))


def test_merge_then_nnx_merge_equals_the_adapted_forward(lm):
    graphdef, base, _, state = lm
    merged = jlora.merge(state, unload=True)
    assert isinstance(merged, nnx.State)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    y = jlora.lora(graphdef)(state, IDS)
    base_y = nnx.merge(graphdef, base)(IDS)
    assert float(jnp.abs(y - base_y).max()) > 0.1  # the adapters change the output
    np.testing.assert_allclose(nnx.merge(graphdef, merged)(IDS), y, atol=1e-5, rtol=0)
    # kept merged (not unloaded), the forward does not apply the adapters twice
    np.testing.assert_allclose(jlora.lora(graphdef)(jlora.merge(state), IDS), y, atol=1e-5)
    np.testing.assert_allclose(jlora.lora(graphdef, mode="merge")(state, IDS), y, atol=1e-5)


def test_pure_under_jit_and_no_state_left_behind(lm):
    graphdef, _, _, state = lm
    forward = jlora.lora(graphdef)
    traces = []

    @jax.jit
    def run(s, ids):
        traces.append(1)
        return forward(s, ids)

    y = forward(state, IDS)
    np.testing.assert_allclose(run(state, IDS), y, atol=1e-6)
    np.testing.assert_allclose(run(state, IDS), y, atol=1e-6)
    assert len(traces) == 1
    model = nnx.merge(graphdef, jlora.merge(state, unload=True))
    kinds = {type(m).__name__ for _, m in nnx.iter_modules(model)}
    assert not any(k.startswith("Lora") for k in kinds)  # graphdef untouched
    # the pure dict (what jlora.train carries) runs the same
    np.testing.assert_allclose(forward(nnx.State.to_pure_dict(state), IDS), y, atol=1e-6)


def test_dropout_on_the_adapter_input_from_dropout_rng(lm):
    graphdef, _, _, state = lm
    plain = jlora.lora(graphdef)(state, IDS)
    drop = jlora.lora(graphdef, dropout=0.5)
    key = jax.random.key(3)
    np.testing.assert_array_equal(drop(state, IDS), plain)  # no rng: no dropout
    a, b = drop(state, IDS, dropout_rng=key), drop(state, IDS, dropout_rng=key)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - plain).max()) > 1e-3
    assert float(jnp.abs(a - drop(state, IDS, dropout_rng=jax.random.key(4))).max()) > 1e-3
    with pytest.raises(KeyTypeError):
        drop(state, IDS, dropout_rng=3)


def test_conv_adapter_runs_without_forming_delta_w():
    model = ConvNet(nnx.Rngs(0))
    config = jlora.LoraConfig(rank=2, alpha=2, targets=["conv", "head"])
    graphdef, _, state = adapted(model, config)
    state = perturb_b(state)
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    y = jlora.lora(graphdef, on_unconsumed="raise")(state, x)
    np.testing.assert_allclose(y, nnx.merge(graphdef, jlora.merge(state, unload=True))(x),
                               atol=1e-5)


class Raw(nnx.Module):
    """A layer that reads its kernel itself: no supported layer consumes its adapter."""

    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x):
        return x @ self.kernel[...]


def test_unconsumed_adapter_is_merged_on_read_or_raises():
    graphdef, state = nnx.split(Raw(nnx.Rngs(0)))
    state = perturb_b(jlora.inject(state, jlora.LoraConfig(rank=2, targets=".*"),
                                   jax.random.key(1)))
    x = jnp.ones((2, 4))
    y = jlora.lora(graphdef)(state, x)
    np.testing.assert_allclose(y, nnx.merge(graphdef, jlora.merge(state, unload=True))(x),
                               atol=1e-5)
    with pytest.raises(UnconsumedAdapterError, match="on_unconsumed='merge'"):
        jlora.lora(graphdef, on_unconsumed="raise")(state, x)


def test_stateful_model_keeps_its_other_variables():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.up(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    adapted_state = perturb_b(jlora.inject(state, jlora.LoraConfig(rank=2, targets=["up"]),
                                           jax.random.key(1)))
    x = jnp.ones((3, 4))
    y = jlora.lora(graphdef)(adapted_state, x)
    ref = nnx.merge(graphdef, jlora.merge(adapted_state, unload=True))(x)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_a_graphdef_of_another_model_is_a_clear_error(lm):
    _, _, state, _ = lm
    other, _ = nnx.split(TinyLM(layers=1))
    with pytest.raises(NnxStateError, match="does not belong|paths differ"):
        jlora.lora(other)(state, IDS)
    conv_graphdef, _ = nnx.split(ConvNet(nnx.Rngs(0)))
    with pytest.raises(NnxStateError, match="graphdef"):
        jlora.lora(conv_graphdef)(state, IDS)


def test_a_module_instead_of_its_graphdef_is_a_clear_error():
    with pytest.raises(ConfigError, match="nnx.split"):
        jlora.lora(TinyLM())
    graphdef = nnx.split(TinyLM())[0]
    with pytest.raises(NnxStateError, match="nnx.State"):
        jlora.lora(graphdef)([1, 2], IDS)
    for bad in ({"mode": "fold"}, {"on_unconsumed": "skip"}, {"dropout": 1.0}):
        with pytest.raises(ConfigError):
            jlora.lora(graphdef, **bad)


def test_dora_runs_in_the_layers_and_equals_the_merged_model():
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["qkv", "out", "up", "down"],
                              use_dora=True)
    graphdef, _, state = adapted(TinyLM(), config)
    state = perturb_b(state)
    flat = {}
    for path, var in nnx.to_flat_state(state):  # magnitudes off their init (‖W + ΔW‖)
        if str(path[-1]).endswith("_lora_magnitude"):
            var = var.replace(var.get_value() * jnp.linspace(0.5, 1.5, var.get_value().size
                                                             ).reshape(var.get_value().shape))
        flat[tuple(path)] = var
    state = nnx.State.from_flat_path(flat)
    forward = jlora.lora(graphdef, on_unconsumed="raise")
    y = forward(state, IDS)
    np.testing.assert_allclose(y, nnx.merge(graphdef, jlora.merge(state, unload=True))(IDS),
                               atol=1e-4)
    g = jax.grad(lambda s: jnp.sum(jlora.lora(graphdef, dropout=0.3)(
        s, IDS, dropout_rng=jax.random.key(0)) ** 2))(state)
    assert float(jnp.abs(g["blocks"][0]["up"]["kernel_lora_magnitude"].get_value()).max()) > 0


def test_dora_on_an_embedding_is_a_layout_error(lm):
    graphdef, _, state, _ = lm
    tree = nnx.State.to_pure_dict(state)  # a hand-made tree: inject refuses DoRA on Embed
    tree["embed"]["embedding_lora_magnitude"] = jnp.ones(16)
    with pytest.raises(LayoutError, match="DoRA adapts Linear"):
        jlora.lora(graphdef)(tree, IDS)


def test_named_adapters_on_a_state(lm):
    """A second adapter beside the default one in an nnx State: each selection equals the
    merged selection, all of them run by default, and training one leaves the other as is."""
    graphdef, base, _, state = lm
    two = jlora.inject(state, jlora.LoraConfig(rank=2, targets=["up", "qkv"], init="random"),
                       jax.random.key(3), name="b", layout=jlora.layout(TinyLM()))
    assert isinstance(two, nnx.State) and jlora.adapter_names(two) == ("default", "b")
    fwd = lambda **kw: jlora.lora(graphdef, **kw)(two, IDS)  # noqa: E731
    merged = lambda names: nnx.merge(graphdef, jlora.merge(  # noqa: E731
        jlora.select(two, names), unload=True))(IDS)
    np.testing.assert_allclose(fwd(), merged(("default", "b")), atol=2e-5)
    np.testing.assert_allclose(fwd(adapter="b"), merged("b"), atol=2e-5)
    np.testing.assert_allclose(fwd(adapter="default"), jlora.lora(graphdef)(state, IDS),
                               atol=1e-6)
    np.testing.assert_array_equal(fwd(adapter=None), nnx.merge(graphdef, base)(IDS))
    assert float(jnp.abs(fwd(adapter="b") - fwd(adapter=None)).max()) > 1e-3
    # a mixed batch: each example its own adapter (the Einsum 'out' layer holds none of 'b',
    # but it holds the default adapter, which a mixed batch cannot route through an Einsum)
    plain = jlora.select(two, "b")  # 'b' only: Linear and LinearGeneral layers
    route = jnp.arange(IDS.shape[0]) % 2 - 1  # -1, 0, -1, 0...: the base model, then 'b'
    mixed = jlora.lora(graphdef, adapter=route)(plain, IDS)
    each = {-1: jlora.lora(graphdef, adapter=None)(plain, IDS),
            0: jlora.lora(graphdef, adapter="b")(plain, IDS)}
    for i, a in enumerate(route.tolist()):
        np.testing.assert_allclose(mixed[i], each[a][i], atol=1e-5)
    assert float(jnp.abs(each[0] - each[-1]).max()) > 1e-3
    with pytest.raises(LayoutError, match="Dense, DenseGeneral and Embed layers, not Einsum"):
        jlora.lora(graphdef, adapter=route % 2)(two, IDS)
    lab = nnx.to_flat_state(jlora.labels(two, adapter="b"))
    picked = {".".join(map(str, k)): getattr(v, "get_value", lambda v=v: v)() for k, v in lab}
    assert picked["blocks.0.up.kernel_lora_a@b"] == "trainable"
    assert picked["blocks.0.up.kernel_lora_a"] == "frozen"
