"""Two processes x 2 CPU devices under jax.distributed (gloo on loopback) train like one
process with 4 devices, and save and restore one orbax checkpoint from both processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from _jtrain_util import CONFIG, data, make_params, rel

import jlora.train as T
from jlora.checkpoint import Checkpointer
from jlora.errors import MeshError

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    port, ckpt = _free_port(), tmp_path / "ckpt"
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), str(HERE)])
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    envs = [env, {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}]
    procs = [subprocess.Popen([sys.executable, str(HERE / "_mh_worker.py"), str(i), "2",
                               str(port), str(ckpt), str(tmp_path / f"out{i}.json")],
                              env=envs[i], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]

    # the same program in this process on 4 of its devices
    model, params = make_params()
    tx = optax.adamw(1e-2)
    mesh = T.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    state, frozen, sh = T.init(params, tx, jax.random.key(0), mesh=mesh)
    step = T.make_train_step(T.causal_lm_loss(model.apply), tx, sh, accum_steps=2)
    ref = []
    for i in range(5):
        state, m = step(state, frozen, T.shard_batch(data().batch(i), sh.batch, multiple=2))
        ref.append(float(m["loss"]))
    worst = max(abs(a - b) / abs(b) for o in outs for a, b in zip(o["losses"], ref))
    print(f"\n2 processes x 2 devices vs 1 process x 4: max rel loss diff {worst:.2e}")
    assert worst <= 1e-5
    assert all(o["restored_equal"] and o["position"] == 5 and o["steps"] == 5
               and o["trace_count"] == 1 for o in outs)
    # the checkpoint both processes wrote restores here, onto 8 devices
    assert sorted(p.name for p in ckpt.iterdir()) == ["5"]
    mesh8 = T.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    target, _, _ = T.init(params, tx, jax.random.key(0), mesh=mesh8)
    with Checkpointer(ckpt, CONFIG) as c:
        restored, position = c.restore(target)
    assert position == 5 and int(restored.step) == 5
    err = rel(restored.params, state.params)
    print(f"restored adapters vs single-process run: max rel diff {err:.2e}")
    assert err <= 1e-5
    assert np.isfinite(err)


def test_initialize_rejects_incomplete_configs(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MeshError, match="needs coordinator_address, num_processes and "
                                        "process_id"):
        T.initialize("127.0.0.1:1")
    with pytest.raises(MeshError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        T.initialize("127.0.0.1:1", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(MeshError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        T.initialize("127.0.0.1:1", process_id=0)
    assert T.initialize(num_processes=1) is False  # one process: nothing to start
