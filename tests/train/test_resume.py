"""Resume is exact: runs killed with SIGKILL (one during an async save) and resumed from
their last finalized checkpoint give the per-step losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _jtrain_util import data

import jlora.train as T

HERE = Path(__file__).parent
TOTAL = 8


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), str(HERE)])
    return env


def _cmd(ckpt, out, *extra):
    return [sys.executable, str(HERE / "_resume_worker.py"), str(ckpt), str(TOTAL), str(out),
            *map(str, extra)]


def _lines(out):
    return [json.loads(x) for x in Path(out).read_text().splitlines() if x.strip()]


def _reference():
    from _resume_worker import ACCUM, build

    state, frozen, sh, step = build()
    losses = []
    for i in range(TOTAL):
        state, m = step(state, frozen, T.shard_batch(data().batch(i), sh.batch, multiple=ACCUM))
        losses.append(float(m["loss"]))
    return losses


@pytest.mark.slow
def test_killed_runs_resume_exactly(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "losses.jsonl"
    # run 1: SIGKILLs itself right after starting the async save of step 3
    r = subprocess.run(_cmd(ckpt, out, 3), env=_env(), timeout=300, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-3000:]
    left = sorted(p.name for p in ckpt.iterdir())
    half_written = [n for n in left if ".orbax-checkpoint-tmp" in n]
    finalized = [int(n) for n in left if n.isdigit()]
    print(f"\nafter SIGKILL during the save of step 3: finalized {finalized}, "
          f"half-written {half_written}")
    assert max(finalized) <= 3 and (3 in finalized or any(n.startswith("3.") for n in
                                                          half_written))
    # run 2: resumes, killed from outside once it has logged step 5 (mid save or mid step)
    proc = subprocess.Popen(_cmd(ckpt, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not any(x.get("step") == 5 for x in _lines(out)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # run 3: resumes and finishes
    r = subprocess.run(_cmd(ckpt, out), env=_env(), timeout=300, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]

    lines = _lines(out)
    resumed = [x["resumed_from"] for x in lines if "resumed_from" in x]
    print(f"runs resumed from data positions {resumed}")
    # run 2 restored the newest finalized step, never the half-written one
    assert resumed[0] == 0 and resumed[1] == max(finalized) and resumed[2] >= resumed[1]
    ref = _reference()
    seen: dict[int, list[float]] = {}
    for x in lines:
        if "step" in x:
            seen.setdefault(x["step"], []).append(x["loss"])
    assert sorted(seen) == list(range(TOTAL))
    worst = max(abs(v - ref[s]) / abs(ref[s]) for s, vs in seen.items() for v in vs)
    print(f"max rel diff of every logged loss vs the uninterrupted run: {worst:.2e}")
    assert worst <= 1e-6
