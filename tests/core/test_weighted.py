"""add_weighted_adapter: rank rules, embeddings and multi-axis kernels, and every bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_named_adapters import BASE, IDS, LAYOUT, MODEL, P2

import jlora
from jlora import LoraConfig
from jlora.errors import AdapterNameError, AlreadyInjectedError, ConfigError, KeyTypeError


def _delta(p, module, name):
    return np.asarray(jlora.delta(p)[jlora.paths.named(module, name)])


def test_svd_and_cat_on_embeddings_and_multi_axis_kernels():
    """'math' adapts up/down/emb, 'default' up/heads/emb with other ranks: cat is exact on
    every param; a full-rank svd too."""
    q = jlora.add_weighted_adapter(P2, ["default", "math"], [1.0, 0.5], "cat",
                                   combination_type="cat")
    q = jlora.add_weighted_adapter(q, ["default", "math"], [1.0, 0.5], "svd", svd_rank=8)
    for module in ("up.kernel", "emb.embedding", "heads.kernel", "down.kernel"):
        want = sum(w * _delta(P2, module, n) for n, w in (("default", 1.0), ("math", 0.5))
                   if jlora.paths.named(module, n) in jlora.delta(P2))
        np.testing.assert_allclose(_delta(q, module, "cat"), want, atol=1e-5)
        np.testing.assert_allclose(_delta(q, module, "svd"), want, atol=1e-4)
    leaves = q["params"]["heads"]
    assert leaves["kernel_lora_a@cat"].shape == (24, 5)  # ranks 2 + 3, zero slots for math
    assert leaves["kernel_lora_b@svd"].shape == (8, 2, 8)


def test_svd_truncates_and_clamps():
    q = jlora.add_weighted_adapter(P2, ["default", "math"], [1.0, 1.0], "t", svd_rank=1)
    d = _delta(q, "up.kernel", "t")
    assert np.linalg.matrix_rank(d, tol=1e-5) == 1
    full = _delta(P2, "up.kernel", "default") + _delta(P2, "up.kernel", "math")
    s = np.linalg.svd(full, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(full - d), np.sqrt((s[1:] ** 2).sum()),
                               rtol=1e-4)
    c = jlora.add_weighted_adapter(P2, ["default", "math"], [1.0, 1.0], "c", svd_clamp=0.5)
    a = np.asarray(c["params"]["up"]["kernel_lora_a@c"])
    b = np.asarray(c["params"]["up"]["kernel_lora_b@c"])
    hi = max(np.abs(a).max(), np.abs(b).max())
    assert np.isclose(np.abs(a).max(), hi) or np.isclose(np.abs(b).max(), hi)
    assert (np.isclose(np.abs(a), hi).sum() + np.isclose(np.abs(b), hi).sum()) > 1


def test_one_adapter_is_linear_and_equal_ranks_elementwise():
    q = jlora.add_weighted_adapter(P2, ["math"], [2.0], "twice", combination_type="ties",
                                   density=0.1)
    np.testing.assert_allclose(_delta(q, "up.kernel", "twice"),
                               2.0 * _delta(P2, "up.kernel", "math"), atol=1e-5)
    # the combined adapter runs like any other
    y = jlora.lora(MODEL.apply, adapter="twice")(q, IDS)
    want = MODEL.apply(jlora.merge(jlora.select(q, "twice"), unload=True), IDS)
    np.testing.assert_allclose(y, want, atol=2e-5)


def _same_targets(rank_b=2, targets_b=("up", "heads", "emb")):
    p = jlora.inject(BASE, LoraConfig(rank=2, targets=["up", "heads", "emb"], init="random"),
                     jax.random.key(0), layout=LAYOUT)
    return jlora.inject(p, LoraConfig(rank=rank_b, targets=list(targets_b), init="random"),
                        jax.random.key(1), layout=LAYOUT, name="b")


def test_bad_input():
    p = _same_targets()
    add = jlora.add_weighted_adapter
    ok = dict(adapters=["default", "b"], weights=[1.0, 1.0], name="n")
    with pytest.raises(AdapterNameError, match="no adapter named 'zz'.*'default', 'b'"):
        add(p, ["default", "zz"], [1.0, 1.0], "n")
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named 'b'"):
        add(p, ["default", "b"], [1.0, 1.0], "b")
    with pytest.raises(ConfigError, match="need equal ranks"):
        add(_same_targets(rank_b=3), **ok, combination_type="linear")
    with pytest.raises(ConfigError, match=r"same params; emb.embedding is adapted by \['default'\]"):
        add(_same_targets(targets_b=("up", "heads")), **ok, combination_type="ties",
            density=0.5)
    for kw, match in ((dict(combination_type="ties"), "pass density"),
                      (dict(combination_type="dare_ties", density=1.5), "pass density"),
                      (dict(combination_type="nope"), "choose one of"),
                      (dict(majority_sign_method="most"), "'total' or 'frequency'"),
                      (dict(svd_rank=0), "svd_rank"), (dict(svd_clamp=2.0), "svd_clamp")):
        with pytest.raises(ConfigError, match=match):
            add(p, **ok, **kw)
    with pytest.raises(KeyTypeError, match="pass key="):
        add(p, **ok, combination_type="dare_linear", density=0.5)
    for bad in (dict(weights=[1.0]), dict(weights=[1.0, float("nan")]), dict(weights="ab")):
        with pytest.raises(ConfigError, match="finite numbers"):
            add(p, **{**ok, **bad})
    with pytest.raises(ConfigError, match="non-empty list"):
        add(p, "default", [1.0], "n")
    with pytest.raises(ConfigError, match="name one twice"):
        add(p, ["b", "b"], [1.0, 1.0], "n")
    d = jlora.inject(BASE, LoraConfig(rank=2, targets=["up"], use_dora=True), jax.random.key(0))
    d = jlora.inject(d, LoraConfig(rank=2, targets=["up"]), jax.random.key(1), name="b")
    with pytest.raises(ConfigError, match="not DoRA adapters"):
        add(d, **ok)
    assert jnp.isfinite(add(p, **ok)["params"]["up"]["kernel_lora_a@n"]).all()
