"""Saves killed at any instant: the target is the old output or the new one, and loads.

A worker process runs one save_peft or save_merged and is SIGKILLed either at an exact
protocol point (it counts its own ``os.replace``/``rename``/``unlink``/``rmdir``/``mkdir``/
``fsync`` calls and kills itself before the k-th one, for every k) or after a random delay
(fixed seed). Afterwards the target, once a load or save has settled it, holds exactly the
files of the old output or of the new one (a user's file beside them untouched), and the
next save leaves nothing else in the parent directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from safetensors.numpy import load_file

import jlora
from jlora.errors import OutputPathError
from jlora.hf import load, load_peft, save_merged, save_peft
from jlora.hf.output import MERGED_MODEL, PEFT_ADAPTER, settle
from jlora.models import arch_spec

REPO = Path(jlora.__file__).resolve().parents[1]
# One process per saver imports jlora and loads the tree once (JAX's backend stays
# uninitialised there), then forks a child per job; the child kills itself with SIGKILL
# before its k-th protocol call or from a timer thread after a delay.
WORKER = r"""
import json, os, signal, sys, threading, time
setup = json.loads(sys.argv[1])
import numpy as np
import jlora
from jlora.hf import save_merged, save_peft

tree = {}
with np.load(setup["data"]) as data:
    for key in data.files:
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = data[key]
if setup["saver"] == "save_peft":
    config = jlora.LoraConfig(**setup["config"])
    save = lambda target: save_peft(tree, config, target)
else:
    from jlora.models import arch_spec
    model = arch_spec(setup["hf_config"]["model_type"]).build(setup["hf_config"], None)
    save = lambda target: save_merged(model, tree, setup["hf_config"], target,
                                      max_shard_size=setup["shard"])

def child(job):
    calls = [0]
    def counted(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == job["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call
    for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync"):
        setattr(os, name, counted(getattr(os, name)))
    if job["delay"] is not None:
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
        threading.Timer(job["delay"], kill).start()
    start = time.perf_counter()
    save(job["target"])
    seconds = time.perf_counter() - start
    time.sleep(job["delay"] or 0)  # finished early: the timer still fires, after the save
    print(json.dumps({"calls": calls[0], "seconds": seconds}), flush=True)

for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child(job)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"killed": killed, "status": status}), flush=True)
"""
PEFT_CONFIG = dict(rank=2, alpha=4, targets=["q_proj", "v_proj"], init="random")
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
USER_FILE = "notes.txt"


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def _files(directory, kind):
    """{name: sha256} of the kind's files in ``directory`` (None if it is absent)."""
    if not directory.exists():
        return None
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if kind.owns(p.name)
    }


class Saver:
    """One saver's fixtures: old and new trees, their reference outputs, a worker job."""

    def __init__(self, root: Path, saver: str):
        self.root, self.saver = root, saver
        self.kind = PEFT_ADAPTER if saver == "save_peft" else MERGED_MODEL
        root.mkdir()
        if saver == "save_peft":
            rng = np.random.default_rng(0)
            layer = {m: {"kernel": rng.normal(size=(16, 16)).astype(np.float32)}
                     for m in ("q_proj", "k_proj", "v_proj")}  # fmt: skip
            self.base = {"model": {"layers": {str(i): {"self_attn": layer} for i in range(2)}}}
            self.config = jlora.LoraConfig(**PEFT_CONFIG)
            old, new = (jlora.inject(self.base, self.config, jax.random.key(s)) for s in (1, 2))
            self.extra = {"config": PEFT_CONFIG}
        else:
            self.hf_config = tf.LlamaConfig(**LLAMA).to_dict()
            self.model = arch_spec("llama").build(self.hf_config, None)
            ids = jnp.ones((1, 4), jnp.int32)
            old, new = (self.model.init(jax.random.key(s), ids)["params"] for s in (1, 2))
            # the old export is sharded, the new one a single file: stale shards must go
            self.extra = {"hf_config": self.hf_config, "shard": "5GB"}
        self.trees = {"old": old, "new": new}
        self.refs = {}
        for name, tree in self.trees.items():
            np.savez(root / f"{name}.npz", **_flat(tree))
            self.refs[name] = self.save(tree, root / f"ref-{name}" / "out", name)

    def save(self, tree, target, which="new"):
        if self.saver == "save_peft":
            return save_peft(tree, self.config, target)
        shard = "16KB" if which == "old" else "5GB"
        return save_merged(self.model, tree, self.hf_config, target, max_shard_size=shard)

    def setup(self):
        return {"saver": self.saver, "data": str(self.root / "new.npz"), **self.extra}


def _run(saver, jobs):
    """Runs ``jobs`` ({target, kill_at, delay}) in one worker; returns their results."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(saver.setup())],
        input="".join(json.dumps(job) + "\n" for job in jobs),
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    results = [json.loads(line) for line in proc.stdout.splitlines() if '"status"' in line]
    if proc.returncode != 0 or len(results) != len(jobs):
        raise AssertionError(f"worker failed: {proc.stderr[-3000:]}")
    return results, [json.loads(line) for line in proc.stdout.splitlines() if '"calls"' in line]


def _check_after_kill(saver: Saver, target: Path, had_old: bool):
    old = _files(saver.refs["old"], saver.kind) if had_old else None
    new = _files(saver.refs["new"], saver.kind)
    got = _files(target, saver.kind)
    # before any jlora call, a reader (transformers, peft) finds the old output, the new one,
    # or no key file (config.json / adapter_config.json): never a mix that loads
    assert got in (old, new) or saver.kind.key not in got, (target, got)
    settle(target)  # what the next save or load does first
    got = _files(target, saver.kind)
    assert got in (old, new), (target, got)
    if got is not None:
        assert (target / USER_FILE).read_text() == "mine"
        if saver.saver == "save_peft":
            back, _ = load_peft(saver.base, target)
            which = "old" if got == old else "new"
            want = saver.trees[which]["model"]["layers"]["0"]["self_attn"]["q_proj"]
            got_a = back["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"]
            np.testing.assert_array_equal(got_a, want["kernel_lora_a"])
        else:
            for name in got:
                if name.endswith(".safetensors"):
                    load_file(target / name)  # whole and readable
    # the next save succeeds without overwrite=True and leaves no debris
    saver.save(saver.trees["new"], target)
    assert _files(target, saver.kind) == new
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


@pytest.fixture(scope="module")
def savers(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return [Saver(root / "peft", "save_peft"), Saver(root / "merged", "save_merged")]


@pytest.mark.slow
def test_sigkill_at_every_protocol_point_and_at_random_moments(savers, tmp_path):
    rng = random.Random(11)

    def kill_all(saver):
        calib = tmp_path / f"calib-{saver.saver}" / "out"
        shutil.copytree(saver.refs["old"], calib)
        _, [stats] = _run(saver, [{"target": str(calib), "kill_at": None, "delay": None}])
        assert _files(calib, saver.kind) == _files(saver.refs["new"], saver.kind)
        # every protocol point once, then random moments spread over the save; two in three
        # replace an old output (with a user's file beside it), one in three is a new path
        points = [(k, None) for k in range(1, stats["calls"] + 1)]
        points += [(None, rng.uniform(0, 1.2 * stats["seconds"])) for _ in range(6)]
        runs, jobs = [], []
        for i, (kill_at, delay) in enumerate(points):
            target = tmp_path / f"{saver.saver}-{i}" / "out"
            had_old = i % 3 != 2
            target.parent.mkdir()
            if had_old:
                shutil.copytree(saver.refs["old"], target)
                (target / USER_FILE).write_text("mine")
            runs.append((target, had_old))
            jobs.append({"target": str(target), "kill_at": kill_at, "delay": delay})
        results, _ = _run(saver, jobs)
        return runs, results

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(kill_all, savers))
    killed = sum(r["killed"] for _, results in done for r in results)
    assert killed >= 30, killed
    for saver, (runs, _) in zip(savers, done):
        for target, had_old in runs:
            if not had_old and target.exists():
                (target / USER_FILE).write_text("mine")  # the new output arrived whole
            _check_after_kill(saver, target, had_old)


# --------------------------------------------------------------- in-process interruptions


class Interrupt(BaseException):
    pass


def _interrupt_at(monkeypatch, name, k):
    """Raises Interrupt before the k-th call of os.<name> (from the next call on)."""
    real, calls = getattr(os, name), []

    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise Interrupt(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, call)


def test_a_save_interrupted_after_its_commit_is_completed_by_load_peft(
    tmp_path, monkeypatch, savers
):
    saver = savers[0]
    target = tmp_path / "out"
    shutil.copytree(saver.refs["old"], target)
    _interrupt_at(monkeypatch, "replace", 1)  # the first file move of the apply
    with pytest.raises(Interrupt):
        saver.save(saver.trees["new"], target)
    monkeypatch.undo()
    commit = tmp_path / ".out.jlora-commit"
    assert commit.is_dir() and not (target / "adapter_config.json").exists()  # not loadable
    back, _ = load_peft(saver.base, target)  # settles first
    assert not commit.exists()
    assert _files(target, PEFT_ADAPTER) == _files(saver.refs["new"], PEFT_ADAPTER)
    want = saver.trees["new"]["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel_lora_b"]
    got = back["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel_lora_b"]
    np.testing.assert_array_equal(got, want)


def test_an_interrupted_merged_save_is_completed_by_load_and_the_next_save(
    tmp_path, monkeypatch, savers
):
    merged = savers[1]
    for completes in ("load", "save"):
        target = tmp_path / completes / "out"
        shutil.copytree(merged.refs["old"], target)
        (target / "tokenizer.json").write_text("{}")
        _interrupt_at(monkeypatch, "unlink", 2)  # old key gone, stale shards half removed
        with pytest.raises(Interrupt):
            merged.save(merged.trees["new"], target)
        monkeypatch.undo()
        assert not (target / "config.json").exists()
        if completes == "load":
            _, params, _ = load(target)
            want = merged.trees["new"]["model"]["norm"]["scale"]
            np.testing.assert_array_equal(params["params"]["model"]["norm"]["scale"], want)
        else:
            merged.save(merged.trees["old"], target, "old")
        want = "new" if completes == "load" else "old"
        assert _files(target, MERGED_MODEL) == _files(merged.refs[want], MERGED_MODEL)
        assert (target / "tokenizer.json").read_text() == "{}"
        assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_an_error_before_the_commit_leaves_the_target_as_it_was(tmp_path, monkeypatch, savers):
    saver = savers[0]
    target = tmp_path / "out"
    for old in (None, saver.refs["old"]):
        if old is not None:
            shutil.copytree(old, target)
        before = _files(target, PEFT_ADAPTER)
        _interrupt_at(monkeypatch, "rename", 1)  # the commit: stage -> target or -> journal
        with pytest.raises(Interrupt):
            saver.save(saver.trees["new"], target)
        monkeypatch.undo()
        assert _files(target, PEFT_ADAPTER) == before
        assert [p.name for p in tmp_path.iterdir()] == ([] if old is None else ["out"])


def test_debris_of_dead_saves_is_removed_and_a_live_save_kept(tmp_path, savers):
    import fcntl

    saver = savers[0]
    target = tmp_path / "out"
    dead = tmp_path / ".out.tmp-dead"
    (dead / "adapter_model.safetensors").parent.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    legacy = tmp_path / ".out.old-abc"  # jlora's earlier atomic_dir, killed between renames
    shutil.copytree(saver.refs["old"], legacy / "out")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        saver.save(saver.trees["new"], target)
        names = sorted(p.name for p in tmp_path.iterdir())
    finally:
        os.close(fd)
    assert names == [".out.tmp-live", "out"]
    assert _files(target, PEFT_ADAPTER) == _files(saver.refs["new"], PEFT_ADAPTER)


def test_legacy_old_copy_is_moved_back_when_the_target_is_missing(tmp_path, savers):
    saver = savers[0]
    legacy = tmp_path / ".out.old-abc"
    shutil.copytree(saver.refs["old"], legacy / "out")
    (legacy / "out" / USER_FILE).write_text("mine")
    saver.save(saver.trees["new"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / USER_FILE).read_text() == "mine"  # the old copy came back


def test_unreadable_journal_is_an_error_naming_it(tmp_path, savers):
    saver = savers[0]
    target = tmp_path / "out"
    shutil.copytree(saver.refs["old"], target)
    commit = tmp_path / ".out.jlora-commit"
    commit.mkdir()
    (commit / ".jlora-journal.json").write_text('{"kind": "save_peft", "install": ["../x"]')
    with pytest.raises(OutputPathError, match="jlora-commit.*unreadable"):
        saver.save(saver.trees["new"], target)
    (commit / ".jlora-journal.json").write_text(
        '{"kind": "save_peft", "install": ["../evil"], "remove": []}'
    )
    with pytest.raises(OutputPathError, match="names files the save does not write"):
        load_peft(saver.base, target)


def test_concurrent_saves_to_one_target_take_turns(tmp_path, savers):
    saver = savers[0]
    target = tmp_path / "out"

    def save_many(which):
        for _ in range(5):
            saver.save(saver.trees[which], target)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(save_many, ["old", "new"]))
    got = _files(target, PEFT_ADAPTER)
    assert got in (_files(saver.refs["old"], PEFT_ADAPTER), _files(saver.refs["new"], PEFT_ADAPTER))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
