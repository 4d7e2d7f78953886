"""Adapter-only orbax checkpoints: round trip onto other meshes, keep-last-N, size on disk,
half-written steps never restored, mismatched config or model refused."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import optax
import pytest
from _jtrain_util import CONFIG, TinyLM, make_params

import jlora
import jlora.train as T
from jlora.checkpoint import Checkpointer
from jlora.errors import CheckpointError

TX = optax.adamw(1e-3)


def _state(mesh_shape=(1, 1, 1), model=None, config=CONFIG, bump=0.0):
    _, params = make_params(model, config)
    mesh = T.make_mesh(dict(zip(T.AXES, mesh_shape)), devices=jax.devices()[
        :int(np.prod(mesh_shape))])
    state, _, sh = T.init(params, TX, jax.random.key(0), mesh=mesh)
    # distinct, incompressible values in every leaf (optimizer moments, counters...)
    rng = np.random.default_rng(int(bump))
    noise = lambda x: (x + bump + rng.standard_normal(x.shape)).astype(x.dtype) \
        if x.dtype == np.float32 else x + int(bump) if x.dtype == np.int32 else x
    return jax.tree.map(noise, state), sh


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_round_trip_onto_other_meshes(tmp_path):
    state, sh = _state((2, 2, 2), bump=1.0)
    with Checkpointer(tmp_path, CONFIG) as ckpt:
        assert ckpt.save(7, state, data_position=9)
        ckpt.wait()
        meta = ckpt.metadata()
        assert jlora.LoraConfig.from_json(meta["lora_config"]) == CONFIG
        assert meta["data_position"] == 9 and meta["step"] == 7
        for shape in [(2, 2, 2), (1, 8, 1), (1, 1, 1)]:
            target, tsh = _state(shape)
            restored, position = ckpt.restore(target)
            assert position == 9
            for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(tsh.state)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                assert a.sharding.is_equivalent_to(s, a.ndim)
            assert jax.tree.structure(restored) == jax.tree.structure(state)
    # nothing frozen in it: every stored param is an adapter (A or B), no base weight
    assert {p.rsplit(".", 1)[-1] for p in meta["adapters"]} == {"kernel_lora_a", "kernel_lora_b"}


def test_keep_last_n_async(tmp_path):
    state, _ = _state()
    with Checkpointer(tmp_path, CONFIG, keep=2, async_save=True) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, jax.tree.map(lambda x, k=step: x + k if x.dtype != np.uint32 else x,
                                         state))
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        restored, position = ckpt.restore(state)
        assert position == 4 and int(restored.step) == int(state.step) + 4


def test_size_on_disk_close_to_state_bytes(tmp_path):
    model = TinyLM(hidden=256, ff=512)
    config = jlora.LoraConfig(rank=32, alpha=32, targets="all-linear")
    state, _ = _state(model=model, config=config)
    with Checkpointer(tmp_path, config) as ckpt:
        ckpt.save(1, state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    size = _dir_bytes(tmp_path / "1")
    print(f"\ncheckpoint {size} B on disk for {nbytes} B of adapters + optimizer state: "
          f"{size / nbytes:.4f}x")
    assert size <= 1.1 * nbytes


def test_half_written_step_is_never_restored(tmp_path):
    state, _ = _state()
    with Checkpointer(tmp_path, CONFIG) as ckpt:
        ckpt.save(1, state)
    # what a save killed before its commit leaves: <step>.orbax-checkpoint-tmp-<timestamp>
    tmp = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "1", tmp)
    with Checkpointer(tmp_path, CONFIG) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        _, position = ckpt.restore(state)
        assert position == 1
        with pytest.raises(CheckpointError, match="no finalized checkpoint for step 2"):
            ckpt.restore(state, step=2)
    assert not tmp.exists()  # cleaned up when the manager opened the directory
    with pytest.raises(CheckpointError, match="no finalized checkpoint in"):
        Checkpointer(tmp_path / "empty", CONFIG).restore(state)


def test_mismatched_config_or_model_is_refused(tmp_path):
    state, _ = _state()
    with Checkpointer(tmp_path, CONFIG, model_id="tiny-a") as ckpt:
        ckpt.save(1, state)
    other = jlora.LoraConfig(rank=8, alpha=16, targets=CONFIG.targets, init="random")
    with pytest.raises(CheckpointError, match=r"another LoraConfig: rank: checkpoint 4 vs this "
                                              r"run 8; alpha: checkpoint 8.0 vs this run 16.0"):
        Checkpointer(tmp_path, other).restore(_state(config=other)[0])
    with pytest.raises(CheckpointError, match="saved for model 'tiny-a', not 'tiny-b'"):
        Checkpointer(tmp_path, CONFIG, model_id="tiny-b").restore(state)
    deeper, _ = _state(model=TinyLM(layers=3))
    with pytest.raises(CheckpointError, match=r"different model: params\.layer_2\.\* \(10 "
                                              r"arrays\): only in this run's model"):
        Checkpointer(tmp_path, CONFIG).restore(deeper)
    wider, _ = _state(model=TinyLM(ff=128))
    with pytest.raises(CheckpointError, match=r"shape \(64, 4\) in the checkpoint vs "
                                              r"\(128, 4\) here"):
        Checkpointer(tmp_path, CONFIG).restore(wider)
