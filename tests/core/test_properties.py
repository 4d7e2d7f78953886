"""Invariants over random shapes, ranks and layer types (hypothesis):

* with B = 0 the adapted forward equals the base forward;
* after the adapters are perturbed, merge-then-apply equals lora(apply) (fp32, 1e-5 rel);
* unmerge(merge(p)) gives p back;
* frozen leaves are bit-identical after 10 optimizer steps while the adapters move.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class Net(nn.Module):
    """An input layer of the drawn kind, then a Dense head (so both get adapters)."""

    kind: str
    width: int
    extra: tuple

    @nn.compact
    def __call__(self, x):
        k, w = self.kind, self.width
        if k == "embed":
            emb = nn.Embed(self.extra[0], w, name="layer")
            h = emb(x)
            return emb.attend(nn.Dense(w, name="head")(h))  # tied output head: attend
        if k == "dense":
            h = nn.Dense(w, name="layer")(x)
        elif k == "dense_general":
            h = nn.DenseGeneral((self.extra[0], w), axis=(-2, -1), name="layer")(x)
            h = h.reshape(h.shape[:-2] + (-1,))
        elif k == "einsum":
            h = nn.Einsum((x.shape[-1], self.extra[0], w), "btd,dnh->btnh", name="layer")(x)
            h = h.reshape(h.shape[:-2] + (-1,))
        else:  # conv
            h = nn.Conv(w, (self.extra[0],), padding="SAME", name="layer")(x)
        return nn.Dense(w, name="head")(jnp.tanh(h))


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["dense", "dense_general", "einsum", "conv", "embed"]))
    width = draw(st.integers(2, 7))
    extra = (draw(st.integers(2, 5)),)
    b, t, d = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "embed":
        x = jnp.asarray(rng.integers(0, extra[0], size=(b, t)))
        n_in, n_out = extra[0], width
    elif kind == "dense_general":
        x = jnp.asarray(rng.normal(size=(b, t, extra[0], d)), jnp.float32)
        n_in, n_out = extra[0] * d, extra[0] * width
    elif kind == "einsum":
        x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
        n_in, n_out = d, extra[0] * width
    elif kind == "conv":
        x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
        n_in, n_out = extra[0] * d, width
    else:
        x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
        n_in, n_out = d, width
    rank = draw(st.integers(1, max(1, min(n_in, n_out, width))))
    alpha = draw(st.sampled_from([1.0, 4.0, 16.0]))
    rslora = draw(st.booleans())
    return Net(kind, width, extra), x, jlora.LoraConfig(rank=rank, alpha=alpha,
                                                        targets=["layer", "head"], use_rslora=rslora)


def _setup(case, perturb=False):
    """init + inject (+ perturb) in one jit: eager ops would compile per drawn shape."""
    model, x, cfg = case
    layout = jlora.layout(model, x)

    @jax.jit
    def build(k0, k1):
        variables = model.init(k0, x)
        p = jlora.inject(variables, cfg, k1, layout=layout)
        return variables, p, _perturb(p)

    return (model, x, cfg, *build(jax.random.key(0), jax.random.key(1)))


def _perturb(p, seed=2):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(p)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    out = [jax.random.normal(next(keys), x.shape, x.dtype)
           if jlora.paths.is_trainable_name(jlora.paths.keypath_to_path(kp)) else x
           for kp, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-3)
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@SETTINGS
@given(cases())
def test_forward_merge_unmerge_invariants(case):
    model, x, cfg, variables, p0, p = _setup(case)

    @jax.jit  # one compilation per drawn case keeps the suite fast
    def run(variables, p0, p):
        lora = jlora.lora(model.apply, on_unconsumed="raise")
        return dict(
            base=model.apply(variables, x),
            zero_b=lora(p0, x),
            y=lora(p, x),
            merged=model.apply(jlora.merge(p), x),
            unloaded=model.apply(jlora.merge(p, unload=True), x),
            on_read=jlora.lora(model.apply, mode="merge")(p, x),
            twice=lora(jlora.merge(p), x),  # a merged tree is not adapted twice
            back=jlora.unmerge(jlora.merge(p)),
        )

    out = run(variables, p0, p)
    # with B = 0 the adapted forward equals the base forward
    np.testing.assert_array_equal(np.asarray(out["zero_b"]), np.asarray(out["base"]))
    # after perturbation: adapters do something, and merge-then-apply equals lora(apply)
    assert np.abs(np.asarray(out["y"]) - np.asarray(out["base"])).max() > 1e-3
    for k in ("merged", "unloaded", "on_read", "twice"):
        _close(out[k], out["y"])
    # unmerge(merge(p)) == p
    assert jax.tree.structure(out["back"]) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(out["back"]), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_frozen_bit_identical_after_training(case):
    model, x, cfg, variables, p, _ = _setup(case)
    fwd = jlora.lora(model.apply)
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), p)
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        g = jax.grad(lambda q: jnp.mean(fwd(q, x) ** 2) + jnp.mean(fwd(q, x)))(p)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    p0 = p
    for _ in range(10):
        p, state = step(p, state)
    moved = 0
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(p0)):
        if jlora.paths.is_trainable_name(jlora.paths.keypath_to_path(kp)):
            moved += not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.dtype == b.dtype
    assert moved >= 2


@pytest.mark.parametrize("kind", ["dense", "dense_general", "einsum", "conv", "embed"])
def test_every_layer_kind_is_consumed(kind):
    x = (jnp.ones((2, 3), jnp.int32) if kind == "embed" else
         jnp.ones((2, 3, 4, 5)) if kind == "dense_general" else jnp.ones((2, 3, 5)))
    model = Net(kind, 4, (4,))
    variables = model.init(jax.random.key(0), x)
    p = jlora.inject(variables, jlora.LoraConfig(rank=2, targets=["layer", "head"]),
                     jax.random.key(1), layout=jlora.layout(model, x))
    jlora.lora(model.apply, on_unconsumed="raise")(p, x)  # raises if any adapter were ignored
