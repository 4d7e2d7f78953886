"""plan() / inject(): shapes, initialisers, patterns, shardings, and every bad-input error."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import LoraConfig
from jlora.errors import (
    AlreadyInjectedError,
    ConfigError,
    KeyTypeError,
    LayoutError,
    ShapeError,
    TargetError,
)

KEY = jax.random.key(0)


def tree():
    r = np.random.default_rng(0)
    layer = lambda: {  # noqa: E731
        "self_attn": {n: {"kernel": r.normal(size=(32, 16)).astype(np.float32)}
                      for n in ("q_proj", "k_proj", "v_proj")},
        "input_layernorm": {"scale": np.ones(32, np.float32)},
    }
    return {"params": {"model": {"embed_tokens": {"embedding": r.normal(size=(50, 32)).astype(np.float32)},
                                 "layers": {"0": layer(), "1": layer()}},
                       "lm_head": {"kernel": r.normal(size=(32, 50)).astype(np.float32)}},
            "cache": {"x": np.zeros(3)}}


def test_inject_adds_leaves_and_keeps_everything_else():
    t = tree()
    p = jlora.inject(t, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]), KEY)
    q = p["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel_lora_a"].shape == (32, 4) and q["kernel_lora_b"].shape == (4, 16)
    assert float(q["kernel_lora_scale"]) == 2.0
    assert np.all(np.asarray(q["kernel_lora_b"]) == 0)
    assert q["kernel"] is t["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert "kernel_lora_a" not in p["params"]["model"]["layers"]["0"]["self_attn"]["k_proj"]
    assert p["cache"] is t["cache"]
    assert "kernel_lora_a" not in t["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
    bare = jlora.inject(t["params"], LoraConfig(rank=4, targets=["q_proj"]), KEY)
    assert "params" not in bare and "kernel_lora_a" in bare["model"]["layers"]["1"]["self_attn"]["q_proj"]


def test_default_init_matches_peft_distribution():
    p = jlora.inject(tree(), LoraConfig(rank=8, targets=["q_proj", "embed_tokens"]), KEY)["params"]
    a = np.asarray(p["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"])
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    emb = p["model"]["embed_tokens"]
    assert np.all(np.asarray(emb["embedding_lora_a"]) == 0)  # PEFT: embeddings A=0, B~N(0,1)
    assert emb["embedding_lora_a"].shape == (50, 8) and emb["embedding_lora_b"].shape == (8, 32)
    assert 0.7 < np.asarray(emb["embedding_lora_b"]).std() < 1.3


def test_gaussian_init_std_is_one_over_rank():
    p = jlora.inject(tree(), LoraConfig(rank=16, alpha=16, targets=r".*_proj", init="gaussian"), KEY)
    a = np.concatenate([np.asarray(m["kernel_lora_a"]).ravel() for layer in
                        p["params"]["model"]["layers"].values() for m in layer["self_attn"].values()])
    assert abs(a.std() - 1 / 16) < 0.01


def test_keys_differ_per_module_and_are_deterministic():
    c = LoraConfig(rank=4, targets=["q_proj"])
    p1, p2 = jlora.inject(tree(), c, KEY), jlora.inject(tree(), c, KEY)
    a0 = p1["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"]
    a1 = p1["params"]["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel_lora_a"]
    assert not np.allclose(a0, a1)
    np.testing.assert_array_equal(a0, p2["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"])
    legacy = jlora.inject(tree(), c, jax.random.PRNGKey(0))  # raw uint32 keys work too
    assert legacy["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"].shape == (32, 4)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_olora_rewrite_kernel_to_residual(init):
    t = tree()
    c = LoraConfig(rank=4, alpha=8, targets=["q_proj"], init=init)
    p = jlora.inject(t, c, KEY)
    q = p["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
    w0 = t["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(q["kernel"], w0)  # the base is now the residual
    assert np.abs(np.asarray(q["kernel_lora_b"])).max() > 0
    merged = jlora.merge(p, unload=True)["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(merged, w0, atol=1e-5)  # adapted model == base model at init
    if init == "pissa":  # A @ B * s is the best rank-4 approximation
        u, s, vh = np.linalg.svd(w0, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        np.testing.assert_allclose(np.asarray(q["kernel_lora_a"] @ q["kernel_lora_b"]) * 2.0, best, atol=1e-4)


def test_rank_and_alpha_patterns_and_rslora():
    c = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}, use_rslora=True)
    plan = {e.module: e for e in jlora.plan(tree(), c)}
    assert plan["model.layers.0.self_attn.v_proj"].rank == 2
    assert plan["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / math.sqrt(2))
    assert plan["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(2 / 2)
    p = jlora.inject(tree(), c, KEY)["params"]["model"]["layers"]["0"]["self_attn"]
    assert p["v_proj"]["kernel_lora_a"].shape == (32, 2)


def test_plan_table_and_counts():
    t = tree()
    p = jlora.plan(t, LoraConfig(rank=4, targets=["q_proj", "embed_tokens"]))
    text = str(p)
    assert "model.layers.1.self_attn.q_proj.kernel" in text and "32x16" in text
    assert p.adapter_params == 2 * 4 * (32 + 16) + 4 * (50 + 32)
    assert f"{p.adapter_params:,}" in text
    s = jlora.summary(jlora.inject(t, LoraConfig(rank=4, targets=["q_proj", "embed_tokens"]), KEY))
    assert s.trainable == p.adapter_params and s.total == p.base_params + p.adapter_params
    assert str(s).startswith(f"trainable params: {s.trainable:,d} || all params: {s.total:,d}")


def test_half_precision_kernels_get_fp32_adapters():
    t = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree()["params"])
    p = jlora.inject(t, LoraConfig(rank=4, targets=["q_proj"]), KEY)
    q = p["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel_lora_a"].dtype == jnp.float32 and q["kernel"].dtype == jnp.bfloat16


def test_adapters_inherit_kernel_sharding():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    spec = jax.sharding.PartitionSpec("fsdp", "tensor")
    k = jax.device_put(jnp.ones((32, 16)), jax.sharding.NamedSharding(mesh, spec))
    p = jlora.inject({"q": {"kernel": k}}, LoraConfig(rank=4, targets=["q"]), KEY)["q"]
    assert p["kernel_lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert p["kernel_lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert p["kernel_lora_scale"].sharding.spec == jax.sharding.PartitionSpec()


def test_adapters_inherit_partitioned_boxes():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                                 ("embed", "mlp")), name="q")(x)

    v = M().init(KEY, jnp.ones((1, 8)))
    p = jlora.inject(v, LoraConfig(rank=2, targets=["q"]), KEY)["params"]["q"]
    assert p["kernel_lora_a"].names == ("embed", None)
    assert p["kernel_lora_b"].names == (None, "mlp")
    assert p["kernel_lora_a"].unbox().shape == (8, 2)
    specs = nn.get_partition_spec(p)
    assert specs["kernel_lora_b"] == jax.sharding.PartitionSpec(None, "mlp")


def test_multi_axis_kernels_need_a_layout():
    m = nn.DenseGeneral((2, 3), axis=-1)
    x = jnp.ones((1, 4))
    v = m.init(KEY, x)
    with pytest.raises(LayoutError, match=r"jlora.layout\(model"):
        jlora.inject(v, LoraConfig(rank=2, targets=".*"), KEY)
    p = jlora.inject(v, LoraConfig(rank=2, targets=".*"), KEY, layout=jlora.layout(m, x))
    assert p["params"]["kernel_lora_a"].shape == (4, 2) and p["params"]["kernel_lora_b"].shape == (2, 2, 3)


@pytest.mark.parametrize("module, x, why", [
    (nn.Einsum((3, 4, 5), "bnd,ndh->bnh"), jnp.ones((2, 3, 4)), "batched kernel"),
    (nn.Einsum((5, 4), "bd,hd->bh"), jnp.ones((2, 4)), "not its leading axes"),
    (nn.Conv(4, (3,), feature_group_count=2), jnp.ones((1, 5, 4)), "grouped"),
    (nn.DenseGeneral(3, axis=-1, batch_dims=(0,)), jnp.ones((2, 4)), "batch_dims"),
])
def test_unsupported_layouts_raise(module, x, why):
    v = module.init(KEY, x)
    with pytest.raises(LayoutError, match=why):
        jlora.inject(v, LoraConfig(rank=1, targets=".*"), KEY, layout=jlora.layout(module, x))


def test_error_target_matches_nothing_lists_nearest():
    with pytest.raises(TargetError, match=r"match no module.*model\.layers\.\d\.self_attn\.q_proj"):
        jlora.inject(tree(), LoraConfig(targets=["q_prj"]), KEY)


def test_error_target_matches_non_matrix_leaf():
    with pytest.raises(TargetError, match="hold no matrix"):
        jlora.plan(tree(), LoraConfig(rank=2, targets=["input_layernorm"]))


def test_error_target_matches_container_module():
    with pytest.raises(TargetError, match="sub-modules.*q_proj"):
        jlora.plan(tree(), LoraConfig(rank=2, targets=["self_attn"]))


@pytest.mark.parametrize("rank", [17, 100])
def test_error_rank_larger_than_kernel(rank):
    with pytest.raises(ShapeError, match=r"exceeds min\(in=32, out=16\)"):
        jlora.inject(tree(), LoraConfig(rank=rank, targets=["q_proj"]), KEY)


def test_error_rank_pattern_larger_than_kernel():
    with pytest.raises(ShapeError, match="rank 20"):
        jlora.plan(tree(), LoraConfig(rank=2, targets=["q_proj"], rank_pattern={"q_proj": 20}))


def test_error_second_inject():
    p = jlora.inject(tree(), LoraConfig(rank=2, targets=["q_proj"]), KEY)
    with pytest.raises(AlreadyInjectedError, match="already holds an adapter named .default."):
        jlora.inject(p, LoraConfig(rank=2, targets=["v_proj"]), KEY)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_error_pattern_matches_no_target(field):
    with pytest.raises(ConfigError, match=f"{field} key 'o_proj' matches none"):
        jlora.plan(tree(), LoraConfig(rank=2, targets=["q_proj"], **{field: {"o_proj": 4}}))


@pytest.mark.parametrize("key", [0, "seed", np.zeros(3, np.uint32), jnp.zeros(2, jnp.float32)])
def test_error_wrong_key_type(key):
    with pytest.raises(KeyTypeError, match=r"jax.random.key\(0\)"):
        jlora.inject(tree(), LoraConfig(rank=2, targets=["q_proj"]), key)


def test_error_config_type_and_pissa_on_embedding():
    with pytest.raises(ConfigError, match="jlora.LoraConfig"):
        jlora.plan(tree(), {"r": 2})
    with pytest.raises(ConfigError, match="embedding"):
        jlora.plan(tree(), LoraConfig(rank=2, targets=["embed_tokens"], init="olora"))


def test_errors_leave_input_untouched():
    t = tree()
    before = jax.tree.map(np.copy, t)
    with pytest.raises(ShapeError):
        jlora.inject(t, LoraConfig(rank=99, targets=["q_proj"]), KEY)
    jax.tree.map(np.testing.assert_array_equal, t, before)
