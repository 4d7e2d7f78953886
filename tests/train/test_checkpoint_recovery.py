"""Checkpoints that recover: a finalized step damaged on disk is a CheckpointError naming the
step and the directory, restore falls back to the newest step that reads (with a warning, or
strictly not), a restore onto another optimizer says what differs, and every argument of the
Checkpointer is checked before any work."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import warnings

import jax
import numpy as np
import optax
import pytest
from _jtrain_util import CONFIG, make_params

import jlora.train as T
from jlora.checkpoint import Checkpointer, CheckpointFallbackWarning
from jlora.errors import CheckpointError, ConfigError

TX = optax.adamw(1e-3)


def _bumped(state, k: float):
    return jax.tree.map(lambda x: x + k if x.dtype == np.float32 else x, state)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pristine directory with steps 1 and 2 (distinct states) and the states."""
    _, params = make_params()
    state, _, _ = T.init(params, TX, jax.random.key(0))
    states = {1: _bumped(state, 1.0), 2: _bumped(state, 2.0)}
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    with Checkpointer(root, CONFIG) as ckpt:
        for step, s in states.items():
            ckpt.save(step, s, data_position=10 * step)
    return root, states, params


def _copy(run, tmp_path):
    root, states, _ = run
    d = tmp_path / "ckpt"
    shutil.copytree(root, d)
    return d, states


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _snapshot(d) -> dict[str, str]:
    out = {}
    for path in glob.glob(f"{d}/**", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _arrays(step_dir) -> list[str]:
    return sorted(glob.glob(f"{step_dir}/state/**/d/*", recursive=True))


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flip(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2
        data[i : i + 8] = bytes(x ^ 0xFF for x in data[i : i + 8])
        f.seek(0)
        f.write(bytes(data))


def _write(path, text: str):
    with open(path, "w") as f:
        f.write(text)


# every way of damaging a finalized step that we know of: (name, how)
DAMAGE = [
    ("truncated_arrays", lambda s: [_truncate(p) for p in _arrays(s)]),
    ("deleted_arrays", lambda s: [os.remove(p) for p in _arrays(s)]),
    ("flipped_bytes", lambda s: [_flip(p) for p in _arrays(s)]),
    ("garbage_meta_json", lambda s: _write(s / "meta" / "metadata", "\0garbage{")),
    (
        "meta_json_missing_fields",
        lambda s: _write(s / "meta" / "metadata", '{"format": "jlora-train-1"}'),
    ),
    ("meta_json_deleted", lambda s: os.remove(s / "meta" / "metadata")),
    ("meta_item_deleted", lambda s: shutil.rmtree(s / "meta")),
    ("state_item_deleted", lambda s: shutil.rmtree(s / "state")),
    ("orbax_tree_metadata_garbage", lambda s: _write(s / "state" / "_METADATA", "garbage")),
    ("orbax_tree_metadata_deleted", lambda s: os.remove(s / "state" / "_METADATA")),
    ("orbax_manifest_garbage", lambda s: _write(s / "state" / "manifest.ocdbt", "garbage")),
    ("orbax_manifest_deleted", lambda s: os.remove(s / "state" / "manifest.ocdbt")),
    ("emptied_step", lambda s: [shutil.rmtree(s), os.mkdir(s)]),
    # what a kill in the middle of orbax deleting an old step (keep=N) can leave
    (
        "half_deleted_step",
        lambda s: [
            shutil.rmtree(s / "state"),
            shutil.rmtree(s / "meta"),
            os.remove(s / "_CHECKPOINT_METADATA"),
        ],
    ),
]


# orbax closes its event loop while tensorstore still completes the other reads of a damaged
# step: their callbacks raise "Event loop is closed" as unraisable exceptions (orbax 0.12)
ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


@ORBAX_CLOSED_LOOP
@pytest.mark.parametrize("damage", [d[1] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_latest_step_is_named_and_restore_falls_back(run, tmp_path, damage):
    d, states = _copy(run, tmp_path)
    damage(d / "2")
    before = _snapshot(d)
    ckpt = Checkpointer(d, CONFIG)
    # listing keeps its meaning: finalized steps, damaged or not
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    where = rf"step 2 in {d} cannot be read: "
    with pytest.raises(
        CheckpointError,
        match=rf"^the latest checkpoint {where}.*Older steps: "
        r"\[1\]; restore\(\.\.\., fallback=True\)",
    ):
        ckpt.restore(states[2], fallback=False)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {where}.*Finalized steps: \[1, 2\]"):
        ckpt.restore(states[2], step=2)  # a named step never falls back
    with pytest.warns(
        CheckpointFallbackWarning,
        match=rf"restored checkpoint step 1 of {d}, not "
        r"the newer step 2 \(",
    ):
        restored, position = ckpt.restore(states[2])
    assert position == 10
    _assert_equal(restored, states[1])
    assert ckpt.readable_steps() == [1]
    assert _snapshot(d) == before  # reading never changes a file
    # the run goes on from step 1: saving step 2 again replaces the damaged one
    assert ckpt.save(2, states[2], data_position=20)
    ckpt.wait()
    assert ckpt.readable_steps() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, position = ckpt.restore(states[1])
    assert position == 20
    _assert_equal(restored, states[2])
    ckpt.close()


def test_metadata_of_a_damaged_step_is_a_checkpoint_error(run, tmp_path):
    d, _ = _copy(run, tmp_path)
    _write(d / "2" / "meta" / "metadata", "{not json")
    ckpt = Checkpointer(d, CONFIG)
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint step 2 in {d} cannot be read: its "
        r"metadata cannot be read \(JSONDecodeError",
    ):
        ckpt.metadata()
    assert ckpt.metadata(1)["data_position"] == 10


@ORBAX_CLOSED_LOOP
def test_no_step_that_reads_lists_each_one(run, tmp_path):
    d, states = _copy(run, tmp_path)
    shutil.rmtree(d / "1" / "state")
    os.remove(d / "2" / "meta" / "metadata")
    with pytest.raises(
        CheckpointError,
        match=rf"no checkpoint step in {d} can be read: step 2: "
        r"its metadata cannot be read .*; step 1: orbax's "
        r"metadata of its state cannot be read",
    ):
        Checkpointer(d, CONFIG).restore(states[2])


@pytest.mark.parametrize(
    "tx,expect",
    [
        (
            optax.sgd(0.1, momentum=0.9),
            r"opt_state\.0\.count: only in the checkpoint; opt_state\.0\.mu\.\* \(20 arrays\): "
            r"only in the checkpoint; .*opt_state\.0\.trace\.\* \(20 arrays\): only in this "
            r"run's state",
        ),
        (
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
            r"opt_state\.1: empty in the checkpoint, a subtree in this run's state; "
            r"opt_state\.1\.0\.\* \(41 arrays\): only in this run's state",
        ),
        # the same arrays, one EmptyState less: orbax would refuse it too
        (optax.adam(1e-3), r"opt_state\.2 \(empty\): only in the checkpoint\. Restore"),
    ],
    ids=["sgd_momentum", "chain_clip_adamw", "adam_not_adamw"],
)
def test_another_optimizer_says_what_differs(run, tmp_path, tx, expect):
    d, _ = _copy(run, tmp_path)
    params = run[2]
    target, _, _ = T.init(params, tx, jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mismatch never falls back to an older step
        with pytest.raises(
            CheckpointError,
            match=rf"checkpoint {d}/2 holds another optimizer "
            r"state than this run's \(was it saved with "
            rf"another optax transform\?\): .*{expect}",
        ):
            Checkpointer(d, CONFIG).restore(target)


def test_optimizer_state_of_another_shape_is_named(run, tmp_path):
    d, states = _copy(run, tmp_path)
    target = T.abstract(states[2])
    layer = target.opt_state[0].nu["params"]["layer_0"]["q_proj"]
    layer["kernel_lora_a"] = jax.ShapeDtypeStruct((3, 4), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"opt_state\.0\.nu\.params\.layer_0\.q_proj\."
        r"kernel_lora_a: shape \(32, 4\) in the checkpoint "
        r"vs \(3, 4\) here",
    ):
        Checkpointer(d, CONFIG).restore(target)


# ---------------------------------------------------------------------- arguments


BAD_INIT = [
    (dict(save_interval_steps=0), ConfigError, r"save_interval_steps=0 must be a positive int"),
    (dict(save_interval_steps=-2), ConfigError, r"save_interval_steps=-2 must be a positive"),
    (dict(save_interval_steps=1.5), ConfigError, r"save_interval_steps=1\.5 must be a positive"),
    (dict(save_interval_steps=True), ConfigError, r"save_interval_steps=True must be a "),
    (dict(save_interval_steps="2"), ConfigError, r"save_interval_steps='2' must be a positive"),
    (dict(keep=0), ConfigError, r"keep=0 must be a positive int or None"),
    (dict(keep=True), ConfigError, r"keep=True must be a positive int or None"),
    (dict(keep="3"), ConfigError, r"keep='3' must be a positive int or None"),
    (dict(model_id=3), ConfigError, r"model_id=3 must be a non-empty string"),
    (dict(model_id=""), ConfigError, r"model_id='' must be a non-empty string"),
    (dict(async_save="yes"), ConfigError, r"async_save='yes' must be True or False"),
]


@pytest.mark.parametrize("kw,cls,msg", BAD_INIT, ids=[str(b[0]) for b in BAD_INIT])
def test_bad_constructor_arguments_are_refused_before_any_work(tmp_path, kw, cls, msg):
    d = tmp_path / "ckpt"
    with pytest.raises(cls, match=msg):
        Checkpointer(d, CONFIG, **kw)
    assert not d.exists()


def test_a_directory_that_cannot_hold_steps_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(CheckpointError, match=rf"checkpoint directory {f} is a file"):
        Checkpointer(f, CONFIG)
    with pytest.raises(CheckpointError, match=r"cannot open the checkpoint directory"):
        Checkpointer(f / "below", CONFIG)
    with pytest.raises(ConfigError, match=r"directory='' must be a non-empty path"):
        Checkpointer("", CONFIG)
    with pytest.raises(ConfigError, match=r"directory=3 must be a non-empty path"):
        Checkpointer(3, CONFIG)
    # a numbered folder of someone else's files would be listed as a step, and deleted by keep
    mine = tmp_path / "shared" / "1"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        CheckpointError,
        match=rf"{mine} looks like checkpoint step 1 but is not "
        r"one .*'notes\.txt'",
    ):
        Checkpointer(tmp_path / "shared", CONFIG)
    assert f.read_text() == "mine" and (mine / "notes.txt").read_text() == "mine"


BAD_SAVE = [
    (dict(step=-1), r"step=-1 must be an int >= 0"),
    (dict(step=1.0), r"step=1\.0 must be an int >= 0"),
    (dict(step=True), r"step=True must be an int >= 0"),
    (dict(step="3"), r"step='3' must be an int >= 0"),
    (dict(step=3, data_position=-1), r"data_position=-1 must be an int >= 0"),
    (dict(step=3, data_position=2.5), r"data_position=2\.5 must be an int >= 0"),
    (dict(step=3, force="yes"), r"force='yes' must be True or False"),
]


@pytest.mark.parametrize("kw,msg", BAD_SAVE, ids=[str(b[0]) for b in BAD_SAVE])
def test_bad_save_arguments_are_refused_before_any_work(run, tmp_path, kw, msg):
    d, states = _copy(run, tmp_path)
    before = _snapshot(d)
    with Checkpointer(d, CONFIG) as ckpt:
        step = kw.pop("step")
        with pytest.raises(ConfigError, match=msg):
            ckpt.save(step, states[2], **kw)
    assert _snapshot(d) == before


def test_step_numbers_and_restore_arguments(run, tmp_path):
    d, states = _copy(run, tmp_path)
    with Checkpointer(d, CONFIG) as ckpt:
        with pytest.raises(CheckpointError, match=rf"checkpoint step 2 already exists in {d}"):
            ckpt.save(2, states[2], force=True)
        # integer scalars of NumPy and JAX (e.g. state.step) are step numbers
        assert ckpt.save(np.int64(3), states[2])
        assert ckpt.save(
            jax.numpy.asarray(4, jax.numpy.int32), states[2], data_position=np.int32(7)
        )
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3, 4] and ckpt.metadata(4)["data_position"] == 7
        with pytest.raises(ConfigError, match=r"step=-1 must be an int >= 0"):
            ckpt.restore(states[2], step=-1)
        with pytest.raises(ConfigError, match=r"fallback='no' must be True or False"):
            ckpt.restore(states[2], fallback="no")
        with pytest.raises(ConfigError, match=r"step=2\.0 must be an int >= 0"):
            ckpt.metadata(2.0)
