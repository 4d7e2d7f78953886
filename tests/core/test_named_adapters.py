"""Named adapters: inject beside others, select / disable / delete, merge by name, train one
while the others stay frozen, and mixed-adapter batches (one adapter per example)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import LoraConfig
from jlora.errors import AdapterNameError, AlreadyInjectedError, ConfigError, LayoutError

VOCAB, D, BATCH, SEQ = 23, 16, 4, 5


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB, D, name="emb")
        h = emb(ids)
        h = nn.gelu(nn.Dense(24, name="up")(h))
        h = nn.DenseGeneral((2, 8), name="heads")(h).reshape(*h.shape[:-1], D)
        return emb.attend(nn.Dense(D, name="down")(h) + h)


MODEL = Net()
IDS = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
BASE = MODEL.init(jax.random.key(1), IDS)
LAYOUT = jlora.layout(MODEL, IDS)


def _perturb(p, key):
    """Random B (and A for embeddings) for every adapter: no comparison runs on B = 0."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(p)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (kp, x), k in zip(leaves, keys):
        name = str(kp[-1].key)
        role = jlora.paths.parse_leaf(name)[0] if jlora.paths.is_adapter_name(name) else ""
        out.append(0.3 * jax.random.normal(k, x.shape, x.dtype)
                   if role.endswith(("_lora_a", "_lora_b")) else x)
    return jax.tree_util.tree_unflatten(tree, out)


def _two(targets_b=("up", "down", "emb"), rank_b=3):
    p = jlora.inject(BASE, LoraConfig(rank=2, alpha=4, targets=["up", "heads", "emb"]),
                     jax.random.key(2), layout=LAYOUT)
    p = jlora.inject(p, LoraConfig(rank=rank_b, alpha=2, targets=list(targets_b)),
                     jax.random.key(3), layout=LAYOUT, name="math")
    return _perturb(p, jax.random.key(4))


P2 = _two()
FWD = jlora.lora(MODEL.apply)


def _merged_only(p, names):
    return MODEL.apply(jlora.merge(jlora.select(p, names), unload=True)
                       if names else jlora.select(p, None), IDS)


def test_names_and_leaves():
    assert jlora.adapter_names(P2) == ("default", "math")
    up = P2["params"]["up"]
    assert {"kernel_lora_a", "kernel_lora_a@math", "kernel_lora_scale@math"} <= set(up)
    assert "kernel_lora_a@math" not in P2["params"]["heads"]
    assert up["kernel_lora_a@math"].shape == (D, 3)
    assert float(up["kernel_lora_scale@math"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("adapter", ["default", "math", ("default", "math"), None])
def test_selection_equals_merging_the_selection(adapter):
    names = (adapter,) if isinstance(adapter, str) else adapter
    want = _merged_only(P2, names)
    got = jlora.lora(MODEL.apply, adapter=adapter)(P2, IDS)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if adapter is None:
        np.testing.assert_array_equal(got, MODEL.apply(BASE, IDS))
    else:  # not vacuous: each selection moves the output
        assert float(jnp.abs(got - MODEL.apply(BASE, IDS)).max()) > 0.05


def test_all_adapters_run_by_default_and_sum():
    np.testing.assert_allclose(FWD(P2, IDS), _merged_only(P2, ("default", "math")),
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(FWD(jlora.merge(P2), IDS), FWD(P2, IDS), atol=2e-5, rtol=1e-5)


def test_merge_and_unmerge_by_name_and_selection_of_a_merged_tree():
    m = jlora.merge(P2, adapter="math")
    assert "kernel_lora_merged@math" in m["params"]["up"]
    assert "kernel_lora_scale" in m["params"]["up"]
    np.testing.assert_allclose(FWD(m, IDS), FWD(P2, IDS), atol=2e-5, rtol=1e-5)
    # selecting 'default' takes the merged 'math' back out of the kernels for the call
    np.testing.assert_allclose(jlora.lora(MODEL.apply, adapter="default")(m, IDS),
                               _merged_only(P2, ("default",)), atol=2e-5, rtol=1e-5)
    back = jlora.unmerge(m, adapter="math")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(P2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert jax.tree.structure(back) == jax.tree.structure(P2)


def test_delete_adapter():
    only = jlora.delete_adapter(P2, "default")
    assert jlora.adapter_names(only) == ("math",)
    np.testing.assert_allclose(FWD(only, IDS), _merged_only(P2, ("math",)), atol=2e-5)
    # deleting a merged adapter takes it out of the kernels first
    gone = jlora.delete_adapter(jlora.merge(P2, adapter="math"), "math")
    np.testing.assert_allclose(FWD(gone, IDS), _merged_only(P2, ("default",)), atol=2e-5)
    assert jlora.adapter_names(jlora.delete_adapter(only, "math")) == ()


def test_delta_keys_name_the_adapter():
    d = jlora.delta(P2)
    assert {"up.kernel", "up.kernel@math", "emb.embedding@math", "heads.kernel"} <= set(d)
    assert "heads.kernel@math" not in d


def test_train_one_adapter_leaves_the_others_bit_identical():
    tx = jlora.optimizer(optax.adam(1e-2), P2, adapter="math")
    state = tx.init(P2)

    def loss(p):
        return jnp.mean(FWD(p, IDS) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = P2
    for _ in range(3):
        p, state = step(p, state)
    flat = dict(jax.tree_util.tree_flatten_with_path(p)[0])
    for kp, before in jax.tree_util.tree_flatten_with_path(P2)[0]:
        name = str(kp[-1].key)
        if name.endswith(("_lora_a@math", "_lora_b@math")):
            assert not np.array_equal(flat[kp], before), name
        else:
            np.testing.assert_array_equal(flat[kp], before, err_msg=name)
    lab = jlora.labels(P2, adapter="math")["params"]["up"]
    assert lab["kernel_lora_a@math"] == "trainable" and lab["kernel_lora_a"] == "frozen"
    trainable, _ = jlora.split(P2, adapter="default")
    assert trainable["params"]["up"]["kernel_lora_a@math"] is None
    assert trainable["params"]["up"]["kernel_lora_a"] is not None


def test_train_init_trains_the_named_adapter_only():
    state, frozen, _ = jlora.train.init(P2, optax.adam(1e-3), jax.random.key(0), adapter="math")
    assert state.params["params"]["up"]["kernel_lora_a"] is None
    assert frozen["params"]["up"]["kernel_lora_a"] is not None
    assert state.params["params"]["up"]["kernel_lora_b@math"] is not None


# ----------------------------------------------------------------------------- mixed batches


def test_mixed_batch_equals_separate_forwards():
    ids = jnp.array([1, -1, 0, 1])
    got = jlora.lora(MODEL.apply, adapter=ids)(P2, IDS)
    per = {-1: MODEL.apply(BASE, IDS), 0: _merged_only(P2, ("default",)),
           1: _merged_only(P2, ("math",))}
    for i, a in enumerate(ids.tolist()):
        np.testing.assert_allclose(got[i], per[a][i], atol=1e-5, rtol=1e-5)
    # the same under jit, indices traced
    jitted = jax.jit(lambda p, x, a: jlora.lora(MODEL.apply, adapter=a)(p, x))(P2, IDS, ids)
    np.testing.assert_allclose(jitted, got, atol=1e-6)


def test_mixed_batch_trains_each_example_into_its_adapter():
    ids = jnp.array([1, 1, -1, 1])  # no example routed to 'default'

    def loss(p):
        return jnp.mean(jlora.lora(MODEL.apply, adapter=ids)(p, IDS) ** 2)

    g = jax.grad(loss)(P2)["params"]["up"]
    assert float(jnp.abs(g["kernel_lora_a@math"]).max()) > 0
    assert float(jnp.abs(g["kernel_lora_b"]).max()) == 0.0


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_mixed_batch_flops_are_the_base_plus_each_examples_low_rank_work():
    p = jlora.inject(BASE, LoraConfig(rank=4, targets=["up", "down"]), jax.random.key(2))
    p = jlora.inject(p, LoraConfig(rank=4, targets=["up", "down"]), jax.random.key(3),
                     name="b")
    p = jlora.inject(p, LoraConfig(rank=4, targets=["up", "down"]), jax.random.key(4),
                     name="c")
    ids = jnp.array([0, 1, 2, 1])
    base = _flops(MODEL.apply, BASE, IDS)
    mixed = _flops(lambda q, x, a: jlora.lora(MODEL.apply, adapter=a)(q, x), p, IDS, ids)
    # one adapter on every example: the base plus exactly the low-rank work of this batch
    one = _flops(lambda q, x: jlora.lora(MODEL.apply, adapter="b")(q, x), p, IDS)
    tokens, r = BATCH * SEQ, 4
    low_rank = 2 * tokens * r * (D + 24) * 2  # x @ A and t @ B, for up (D->24) and down (24->D)
    assert 0.95 * low_rank <= one - base <= 1.05 * low_rank  # XLA's count of that work
    # the routing (per-example scales and index arithmetic: the gather overhead) adds < 10%
    # of the low-rank work and < 2% of the base forward; k separate forwards would cost k-1
    # more base passes
    assert mixed - base <= 1.1 * (one - base), (base, one, mixed)
    assert mixed - one <= 0.02 * base


def test_mixed_batch_generation_equals_per_example_generation(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model, params, _ = jlora.hf.load(tmp_path)
    p = jlora.inject(params, LoraConfig(rank=2, targets=["q_proj", "v_proj"]),
                     jax.random.key(0))
    p = jlora.inject(p, LoraConfig(rank=4, targets=["o_proj", "down_proj"]), jax.random.key(1),
                     name="b")
    p = _perturb(p, jax.random.key(5))
    prompts = np.random.RandomState(0).randint(3, 41, (3, 5))
    route = jnp.array([1, 0, -1])
    from jlora.models.generate import generate

    gen = lambda fn, q, x: generate(  # noqa: E731
        fn, q, x, init_cache=model.init_cache, max_new_tokens=6)
    mixed = np.asarray(gen(jlora.lora(model.apply, adapter=route), p, prompts))
    for i, a in enumerate(route.tolist()):
        sel = None if a < 0 else jlora.adapter_names(p)[a]
        one = np.asarray(gen(jlora.lora(model.apply, adapter=sel), p, prompts[i:i + 1]))
        np.testing.assert_array_equal(mixed[i], one[0])
    # the routes differ, so the rows are not all the base model's
    base = np.asarray(gen(model.apply, params, prompts))
    assert (mixed != base).any()


# ----------------------------------------------------------------------------- bad input


def test_unknown_name_lists_the_names():
    with pytest.raises(AdapterNameError, match=r"no adapter named 'nope'.*'default', 'math'"):
        jlora.lora(MODEL.apply, adapter="nope")(P2, IDS)
    for call in (lambda: jlora.delete_adapter(P2, "nope"), lambda: jlora.select(P2, ["nope"]),
                 lambda: jlora.merge(P2, adapter="nope"), lambda: jlora.split(P2, adapter="x"),
                 lambda: jlora.optimizer(optax.adam(1e-3), P2, adapter="x")):
        with pytest.raises(AdapterNameError, match="its adapters are 'default', 'math'"):
            call()


def test_name_used_twice_and_bad_names():
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named 'math'"):
        jlora.inject(P2, LoraConfig(rank=2, targets=["up"]), jax.random.key(0), name="math")
    for bad in ("", "a.b", "a@b", "a b", 3):
        with pytest.raises(ConfigError, match="adapter name"):
            jlora.inject(BASE, LoraConfig(rank=2, targets=["up"]), jax.random.key(0), name=bad)


def test_mixed_batch_bad_indices():
    with pytest.raises(AdapterNameError, match=r"index 2 is out of range.*0: 'default', 1: 'math'"):
        jlora.lora(MODEL.apply, adapter=jnp.array([0, 2, 1, 0]))(P2, IDS)
    with pytest.raises(AdapterNameError, match="index -2"):
        jlora.lora(MODEL.apply, adapter=np.array([0, -2, 1, 0]))(P2, IDS)
    with pytest.raises(ConfigError, match=r"int array of shape \(batch,\)"):
        jlora.lora(MODEL.apply, adapter=jnp.array([[0, 1]]))(P2, IDS)
    with pytest.raises(ConfigError, match=r"int array of shape \(batch,\)"):
        jlora.lora(MODEL.apply, adapter=jnp.array([0.0, 1.0, 0.0, 1.0]))(P2, IDS)
    with pytest.raises(LayoutError, match="one entry per example"):
        jlora.lora(MODEL.apply, adapter=jnp.array([0, 1]))(P2, IDS)


def test_mixed_batch_refuses_dora_and_merged_adapters():
    p = jlora.inject(BASE, LoraConfig(rank=2, targets=["up"]), jax.random.key(2))
    p = jlora.inject(p, LoraConfig(rank=2, targets=["up"], use_dora=True), jax.random.key(3),
                     name="d")
    with pytest.raises(LayoutError, match="unmerged LoRA adapters only"):
        jlora.lora(MODEL.apply, adapter=jnp.array([0, 1, 0, 1]))(p, IDS)
    with pytest.raises(LayoutError, match="unmerged LoRA adapters only"):
        jlora.lora(MODEL.apply, adapter=jnp.array([0, 1, 0, 1]))(jlora.merge(P2, adapter="math"),
                                                                 IDS)


def test_mixed_batch_in_a_scanned_llama_equals_the_unscanned():
    """jlora's Llama with ``scan_layers`` runs one traced block over stacked params: named
    adapters stack with them, and the per-example routing runs inside the scan."""
    from jlora.models.llama import DecoderConfig, LlamaForCausalLM

    d = 8
    cfg = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=d, rms_norm_eps=1e-6,
                        rope_inv_freq=tuple(10000.0 ** (-i / d) for i in range(0, d, 2)))
    ids = jax.random.randint(jax.random.key(4), (3, 9), 0, 50)
    plain, scanned = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg, scan_layers=True)
    p = plain.init(jax.random.key(0), ids)
    p = jlora.inject(p, LoraConfig(rank=4, targets=["q_proj", "up_proj"], init="random"),
                     jax.random.key(1))
    p = jlora.inject(p, LoraConfig(rank=2, targets=["v_proj", "up_proj", "embed_tokens"],
                                   init="random"), jax.random.key(2), name="b")
    p = _perturb(p, jax.random.key(3))
    route = jnp.array([1, -1, 0])
    y = jlora.lora(plain.apply, adapter=route, on_unconsumed="raise")(p, ids)
    np.testing.assert_allclose(
        jlora.lora(scanned.apply, adapter=route, on_unconsumed="raise")(p, ids), y, atol=1e-5)
    for i, a in enumerate(route.tolist()):
        one = jlora.lora(plain.apply, adapter=None if a < 0 else ("default", "b")[a])(p, ids)
        np.testing.assert_allclose(y[i], one[i], atol=1e-5)


def test_more_bad_input():
    from jlora.adapters import rename
    from jlora.errors import IncompleteAdapterError

    bad = jax.tree_util.tree_map(lambda x: x, P2)
    bad["params"]["up"]["kernel_lora_x@math"] = jnp.zeros(2)
    with pytest.raises(IncompleteAdapterError, match=r"up.kernel_lora_x@math is not a leaf"):
        jlora.lora(MODEL.apply)(bad, IDS)
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named 'math'"):
        rename(P2, "default", "math")
    route = jnp.array([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="needs mode='intercept'"):
        jlora.lora(MODEL.apply, adapter=route, mode="merge")(P2, IDS)
    copies = jlora.inject(BASE, LoraConfig(rank=2, targets=["up"], modules_to_save=["down"]),
                          jax.random.key(0))
    copies = jlora.inject(copies, LoraConfig(rank=2, targets=["up"], modules_to_save=["down"]),
                          jax.random.key(1), name="b")
    with pytest.raises(ConfigError, match="cannot read trainable copies"):
        jlora.lora(MODEL.apply, adapter=route)(copies, IDS)
    with pytest.raises(ConfigError, match="both hold a trainable copy"):
        jlora.lora(MODEL.apply)(copies, IDS)
    one = jlora.lora(MODEL.apply, adapter="b")(copies, IDS)  # one copy per call is fine
    assert one.shape == (BATCH, SEQ, VOCAB)


def test_mixed_batch_refuses_einsum_layers():
    class E(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((D, 3), "btd,do->bto", name="e")(x)

    x = jnp.ones((2, 3, D))
    p = E().init(jax.random.key(0), x)
    p = jlora.inject(p, LoraConfig(rank=2, targets=["e"]), jax.random.key(1),
                     layout=jlora.layout(E(), x))
    with pytest.raises(LayoutError, match="Dense, DenseGeneral and Embed layers, not Einsum"):
        jlora.lora(E().apply, adapter=jnp.array([0, -1]))(p, x)
