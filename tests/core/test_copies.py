"""Trainable copies in the core: PEFT's modules_to_save and bias = none | all | lora_only.

A copy is ``<param>_lora_saved`` beside the param: the model reads it (``lora(fn)``),
training changes it and never the original, ``merge`` swaps it in (keeping the original as
``<param>_lora_original``) and ``unmerge`` swaps it back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import paths as P
from jlora.errors import ConfigError, IncompleteAdapterError, ShapeError, TargetError


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="q_proj")(x)
        h = nn.LayerNorm(name="norm")(jax.nn.gelu(nn.Dense(8, name="v_proj")(h)))
        mlp = nn.Dense(8, name="up")(h)  # inside "block": two params each
        h = h + nn.Dense(8, name="down")(jax.nn.gelu(mlp))
        return nn.Dense(3, name="classifier")(h)


X = jax.random.normal(jax.random.key(0), (4, 6))
MODEL = Net()
BASE = MODEL.init(jax.random.key(1), X)


def _copies(p):
    return sorted(path for path, _ in P.leaves_with_paths(P.params_of(p))
                  if path.endswith(P.SAVED_SUFFIX))


def _perturb_copies(p):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.3 if P.keypath_to_path(kp).endswith(P.SAVED_SUFFIX) else x, p)


@pytest.mark.parametrize("bias, want", [
    ("none", []),
    ("all", ["down", "q_proj", "up", "v_proj"]),  # norm's bias is the copy of norm already
    ("lora_only", ["q_proj", "v_proj"]),
])
def test_which_params_get_a_copy(bias, want):
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"], bias=bias,
                           modules_to_save=["classifier", "norm"])
    p = jlora.inject(BASE, cfg, jax.random.key(2))
    saved = ["classifier.bias", "classifier.kernel", "norm.bias", "norm.scale"]
    assert _copies(p) == sorted([f"{m}.bias_lora_saved" for m in want] +
                                [f"{s}_lora_saved" for s in saved])
    plan = jlora.plan(BASE, cfg)
    assert sorted(path for path, _ in plan.copies) == sorted(
        [f"{m}.bias" for m in want] + saved)
    assert "trainable copies" in str(plan)
    for path in _copies(p):
        module, name = P.split_path(path)
        leaves = p["params"][module]
        np.testing.assert_array_equal(leaves[name], leaves[P.base_name(name)])


def test_modules_to_save_are_no_lora_targets_as_in_peft():
    # PEFT never adapts a module inside a modules_to_save module ("(^|.*\.)m($|\..*)")
    cfg = jlora.LoraConfig(rank=2, targets=".*_proj|classifier", modules_to_save=["classifier"])
    p = jlora.inject(BASE, cfg, jax.random.key(2))
    assert "kernel_lora_a" not in p["params"]["classifier"]
    assert "kernel_lora_saved" in p["params"]["classifier"]
    with pytest.raises(TargetError, match="modules_to_save=.*which are no targets"):
        jlora.inject(BASE, jlora.LoraConfig(rank=2, targets=["classifier"],
                                            modules_to_save=["classifier"]), jax.random.key(2))


def test_modules_to_save_errors():
    with pytest.raises(TargetError, match="modules_to_save entry 'clasifier' matches no "
                                          "module.*classifier"):
        jlora.plan(BASE, jlora.LoraConfig(rank=2, targets=["q_proj"],
                                          modules_to_save=["clasifier"]))
    nested = {"params": {"block": {"up": {"kernel": jnp.ones((2, 2))}}, "q": {
        "kernel": jnp.ones((2, 2))}}}
    with pytest.raises(ConfigError, match="matches 'block' and 'block.up' inside it"):
        jlora.plan(nested, jlora.LoraConfig(rank=1, targets=["q"],
                                            modules_to_save=["block", "up"]))


def test_the_model_reads_the_copies_and_training_changes_only_them():
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], bias="all",
                           modules_to_save=["classifier"], init="random")
    p = jlora.inject(BASE, cfg, jax.random.key(2))
    fwd = jlora.lora(MODEL.apply, on_unconsumed="raise")
    y0 = fwd(p, X)
    p = _perturb_copies(p)
    y = fwd(p, X)
    assert float(jnp.abs(y - y0).max()) > 0.1
    # the same as the model with each param replaced by its copy, adapters merged
    swapped = jax.tree_util.tree_map_with_path(lambda kp, x: x, jlora.merge(p, unload=True))
    np.testing.assert_allclose(MODEL.apply(swapped, X), y, rtol=1e-5, atol=1e-5)
    lab = jlora.labels(p)["params"]
    assert lab["classifier"] == {"bias": "frozen", "bias_lora_saved": "trainable",
                                 "kernel": "frozen", "kernel_lora_saved": "trainable"}
    assert lab["norm"] == {"bias": "frozen", "bias_lora_saved": "trainable", "scale": "frozen"}
    n_copies = sum(int(np.size(x)) for path, x in P.leaves_with_paths(p["params"])
                   if path.endswith(P.SAVED_SUFFIX))
    assert jlora.summary(p).trainable == n_copies + 2 * (6 * 2 + 2 * 8) // 2
    trainable, frozen = jlora.split(p)
    tx = jlora.optimizer(optax.adam(1e-2), trainable)

    @jax.jit
    def step(t, st):
        g = jax.grad(lambda t: jnp.sum(fwd(jlora.combine(t, frozen), X) ** 2))(t)
        u, st = tx.update(g, st, t)
        return optax.apply_updates(t, u), st

    t2, _ = step(trainable, tx.init(trainable))
    new = jlora.combine(t2, frozen)
    c0, c1 = p["params"]["classifier"], new["params"]["classifier"]
    assert not np.array_equal(c0["kernel_lora_saved"], c1["kernel_lora_saved"])
    np.testing.assert_array_equal(c0["kernel"], c1["kernel"])


def test_merge_swaps_the_copy_in_and_unmerge_back():
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], bias="lora_only",
                           modules_to_save=["norm"], init="random")
    p = _perturb_copies(jlora.inject(BASE, cfg, jax.random.key(2)))
    y = jlora.lora(MODEL.apply)(p, X)
    merged = jlora.merge(p)
    assert sorted(merged["params"]["norm"]) == ["bias", "bias_lora_original", "scale",
                                                "scale_lora_original"]
    np.testing.assert_array_equal(merged["params"]["norm"]["scale"],
                                  p["params"]["norm"]["scale_lora_saved"])
    np.testing.assert_allclose(MODEL.apply(merged, X), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.lora(MODEL.apply)(merged, X), y, rtol=1e-5, atol=1e-5)
    back = jlora.unmerge(merged)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    unloaded = jlora.merge(p, unload=True)
    assert sorted(unloaded["params"]["norm"]) == ["bias", "scale"]
    d = jlora.delta(p)
    np.testing.assert_allclose(d["norm.scale"], 0.3, rtol=1e-6)


def test_copies_are_checked_for_wholeness():
    p = jlora.inject(BASE, jlora.LoraConfig(rank=2, targets=["q_proj"],
                                            modules_to_save=["norm"]), jax.random.key(2))
    bad = jax.tree.map(lambda x: x, p)
    del bad["params"]["norm"]["scale"]
    with pytest.raises(IncompleteAdapterError, match=r"norm\.scale is not whole: .*no the "
                                                     r"param 'scale'"):
        jlora.lora(MODEL.apply)(bad, X)
    bad = jax.tree.map(lambda x: x, p)
    bad["params"]["norm"]["scale_lora_original"] = bad["params"]["norm"]["scale"]
    with pytest.raises(IncompleteAdapterError, match="both scale_lora_saved and "
                                                     "scale_lora_original"):
        jlora.merge(bad)
    bad = jax.tree.map(lambda x: x, p)
    bad["params"]["norm"]["scale_lora_saved"] = jnp.ones((3,))
    with pytest.raises(ShapeError, match=r"scale_lora_saved has shape \(3,\), not scale's"):
        jlora.split(bad)


def test_a_copy_owns_its_buffer_so_a_donating_train_step_keeps_the_original():
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], modules_to_save=["classifier"])
    p = jlora.inject(BASE, cfg, jax.random.key(2))
    mesh = jlora.train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    tx = optax.sgd(0.1)
    state, frozen, sh = jlora.train.init(p, tx, jax.random.key(3), mesh=mesh)

    def loss_fn(params, batch, rng):
        return jnp.mean(jlora.lora(MODEL.apply)(params, batch["x"]) ** 2), {}

    step = jlora.train.make_train_step(loss_fn, tx, sh)
    state, _ = step(state, frozen, jlora.train.shard_batch({"x": X}, sh.batch))
    kernel = frozen["params"]["classifier"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(BASE["params"]["classifier"][
        "kernel"]))
    assert not np.array_equal(np.asarray(state.params["params"]["classifier"][
        "kernel_lora_saved"]), np.asarray(kernel))
