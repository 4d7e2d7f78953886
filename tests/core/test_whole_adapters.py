"""An adapter tree that is not whole (a missing A, B, scale or kernel, or shapes that do not
fit) is a clear error in every function that takes a tree, never silently ignored."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.train as T
from jlora import paths as P
from jlora.errors import IncompleteAdapterError, JloraError, ShapeError

X = jnp.ones((2, 4))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.Dense(6, name="body")(x))


MODEL = Net()


def _params(merged: bool = False):
    variables = MODEL.init(jax.random.key(0), X)
    p = jlora.inject(
        variables,
        jlora.LoraConfig(rank=2, targets=["body", "head"], init="random"),
        jax.random.key(1),
    )
    return jlora.merge(p) if merged else p


def _edit(p, module="body", drop=(), put=None):
    """A copy of ``p`` with some leaves of ``params.<module>`` dropped or replaced."""
    out = jax.tree.map(lambda x: x, p)
    leaves = dict(out["params"][module])
    for name in drop:
        del leaves[name]
    leaves.update(put or {})
    out["params"][module] = leaves
    return out


# (name, edit, error class, what the message must say)
BROKEN = [
    (
        "no_b",
        dict(drop=["kernel_lora_b"]),
        IncompleteAdapterError,
        r"body\.kernel is not whole: it has kernel_lora_a, kernel_lora_scale but no kernel_lora_b",
    ),
    (
        "no_a",
        dict(drop=["kernel_lora_a"]),
        IncompleteAdapterError,
        r"body\.kernel is not whole: it has kernel_lora_b, kernel_lora_scale but no kernel_lora_a",
    ),
    (
        "no_scale",
        dict(drop=["kernel_lora_scale"]),
        IncompleteAdapterError,
        r"body\.kernel is not whole: .* no kernel_lora_scale \(or kernel_lora_merged\)",
    ),
    (
        "scale_only",
        dict(drop=["kernel_lora_a", "kernel_lora_b"]),
        IncompleteAdapterError,
        r"body\.kernel is not whole: it has kernel_lora_scale but no kernel_lora_a and no "
        r"kernel_lora_b",
    ),
    (
        "no_kernel",
        dict(drop=["kernel"]),
        IncompleteAdapterError,
        r"body\.kernel is not whole: .* no the param 'kernel' it adapts",
    ),
    (
        "scale_and_merged",
        dict(put={"kernel_lora_merged": jnp.float32(1)}),
        IncompleteAdapterError,
        r"body\.kernel is not whole: it has both kernel_lora_scale and "
        r"kernel_lora_merged",
    ),
    (
        "rank_mismatch",
        dict(put={"kernel_lora_b": jnp.zeros((3, 6))}),
        ShapeError,
        r"body\.kernel does not fit: kernel_lora_a \(4, 2\) has rank 2 but kernel_lora_b "
        r"\(3, 6\) has rank 3",
    ),
    (
        "wrong_in",
        dict(put={"kernel_lora_a": jnp.zeros((5, 2))}),
        ShapeError,
        r"body\.kernel does not fit: kernel_lora_a \(5, 2\) @ kernel_lora_b \(2, 6\) gives "
        r"\(5, 6\), not kernel's shape \(4, 6\)",
    ),
    (
        "transposed_b",
        dict(put={"kernel_lora_b": jnp.zeros((6, 2))}),
        ShapeError,
        r"body\.kernel does not fit: .* rank 2 but kernel_lora_b \(6, 2\) has rank 6",
    ),
    (
        "vector_a",
        dict(put={"kernel_lora_a": jnp.zeros((4,))}),
        ShapeError,
        r"body\.kernel does not fit: kernel_lora_a has shape \(4,\), not \(in\.\.\., r\)",
    ),
    (
        "scale_not_scalar",
        dict(put={"kernel_lora_scale": jnp.ones((2,))}),
        ShapeError,
        r"body\.kernel does not fit: its scale has shape \(2,\), not \(\)",
    ),
]


def _forward_jit(p):
    return jax.jit(jlora.lora(MODEL.apply))(p, X)


def _init(p):
    return T.init(p, optax.sgd(0.1), jax.random.key(2))


# every function that takes an adapted tree, with the name its message starts with
USERS = [
    ("lora", _forward_jit),
    ("lora", lambda p: jlora.lora(MODEL.apply, mode="merge")(p, X)),
    ("merge", jlora.merge),
    ("unmerge", jlora.unmerge),
    ("delta", jlora.delta),
    ("split", jlora.split),
    ("combine", lambda p: jlora.combine(p, jax.tree.map(lambda _: None, p))),
    ("labels", jlora.labels),
    ("optimizer", lambda p: jlora.optimizer(optax.adam(1e-3), p)),
    ("summary", jlora.summary),
    ("jlora.train.init", _init),
]


@pytest.mark.parametrize("name,edit,cls,msg", BROKEN, ids=[b[0] for b in BROKEN])
def test_every_broken_adapter_is_named(name, edit, cls, msg):
    p = _edit(_params(), **edit)
    before = jax.tree.map(np.asarray, p)
    with pytest.raises(cls, match=msg) as e:
        jlora.merge(p)
    assert isinstance(e.value, JloraError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("merge: the adapter of body.kernel")
    assert "jlora.inject" in str(e.value)  # the fix
    # the caller's tree is untouched
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, p))


@pytest.mark.parametrize("what,use", USERS, ids=[f"{u[0]}{i}" for i, u in enumerate(USERS)])
def test_every_user_of_the_tree_refuses_it(what, use):
    for edit, cls in [
        (dict(drop=["kernel_lora_a"]), IncompleteAdapterError),
        (dict(put={"kernel_lora_b": jnp.zeros((3, 6))}), ShapeError),
    ]:
        with pytest.raises(cls, match=rf"^{what}: the adapter of body\.kernel"):
            use(_edit(_params(), **edit))


def test_a_missing_a_is_no_longer_ignored_by_lora_or_merge():
    """The issue's case: without its A, the adapter used to be silently dropped."""
    p = _edit(_params(), drop=["kernel_lora_a"])
    with pytest.raises(IncompleteAdapterError, match=r"lora: .*body\.kernel.*no kernel_lora_a"):
        jlora.lora(MODEL.apply)(p, X)
    with pytest.raises(IncompleteAdapterError, match=r"merge: .*body\.kernel.*no kernel_lora_a"):
        jlora.merge(p, unload=True)


def test_merged_trees_and_split_halves_are_whole():
    p = _params()
    merged = _params(merged=True)
    assert P.check_adapters(P.params_of(merged), "t") == {
        ("body", "kernel", "default"): P.Adapter("lora", True),
        ("head", "kernel", "default"): P.Adapter("lora", True),
    }
    y = jlora.lora(MODEL.apply)(p, X)
    np.testing.assert_allclose(jlora.lora(MODEL.apply)(merged, X), y, atol=1e-5)
    trainable, frozen = jlora.split(p)  # the halves have None holes: still whole
    assert jlora.summary(trainable).trainable == jlora.summary(p).trainable
    jlora.optimizer(optax.adam(1e-3), trainable).init(trainable)
    back = jlora.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    # a hole where B should be still fits A's rank check only against what is there
    assert P.check_adapters(P.params_of(trainable), "t") == {
        ("body", "kernel", "default"): P.Adapter("lora", False),
        ("head", "kernel", "default"): P.Adapter("lora", False),
    }


def test_several_broken_adapters_are_all_listed():
    p = _edit(_edit(_params(), drop=["kernel_lora_b"]), module="head", drop=["kernel_lora_scale"])
    with pytest.raises(
        IncompleteAdapterError,
        match=r"body\.kernel is not whole.*; the adapter "
        r"of head\.kernel is not whole",
    ):
        jlora.delta(p)


def test_the_check_runs_once_per_trace_not_per_step(monkeypatch):
    calls = []
    real = P.check_adapters
    monkeypatch.setattr(P, "check_adapters", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = _params()
    f = jax.jit(jlora.lora(MODEL.apply))
    for _ in range(3):
        f(p, X).block_until_ready()
    assert len(calls) == 1


@pytest.mark.parametrize("saver", ["save_peft", "save_merged"])
def test_savers_refuse_an_adapter_that_is_not_whole(saver, tmp_path):
    import jlora

    base = {"params": {"q": {"kernel": jnp.ones((4, 6))}}}
    cfg = jlora.LoraConfig(rank=2, targets=["q"])
    p = jlora.inject(base, cfg, jax.random.key(0))
    del p["params"]["q"]["kernel_lora_b"]
    with pytest.raises(jlora.errors.IncompleteAdapterError, match="q.kernel"):
        if saver == "save_peft":
            jlora.hf.save_peft(p, cfg, tmp_path / "a")
        else:
            jlora.hf.save_merged(None, p, {"model_type": "llama"}, tmp_path / "m")
    assert not any(tmp_path.iterdir())
