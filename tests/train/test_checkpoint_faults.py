"""SIGKILL at random moments of asynchronous checkpoint saves: afterwards the directory restores
to the step finalized before the kill or to the one being saved, exactly as saved, and the
next save leaves no debris."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from _ckpt_fault_worker import base_state, config, state_at

from jlora.checkpoint import Checkpointer

HERE = Path(__file__).parent
KILLS = 6
SEED = 11


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device: the worker starts faster
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), str(HERE)])
    return env


def _last(lines: list[str], word: str) -> int | None:
    steps = [int(x.split()[1]) for x in lines if x.startswith(word + " ")]
    return steps[-1] if steps else None


def _debris(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.isdigit())


@pytest.mark.slow
def test_sigkill_during_saves_never_loses_the_previous_step(tmp_path):
    d, log = tmp_path / "ckpt", tmp_path / "log"
    base = base_state()
    target = state_at(base, 0)  # jax arrays: their shardings are the restore layout
    rng = random.Random(SEED)
    finalized = None  # the newest step known finalized before each kill
    seen = []
    for kill in range(KILLS):
        first = 1 if finalized is None else finalized + 1
        delay = rng.uniform(0.05, 0.9)
        log.write_text("")
        r = subprocess.run(
            [
                sys.executable,
                str(HERE / "_ckpt_fault_worker.py"),
                str(d),
                str(first),
                f"{delay:.3f}",
                str(log),
            ],
            env=_env(),
            timeout=120,
            capture_output=True,
        )
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-3000:]
        lines = log.read_text().splitlines()
        started, done = _last(lines, "start"), _last(lines, "done")
        previous = done if done is not None else finalized
        left = _debris(d) if d.exists() else []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback over a damaged step: there is none
            ckpt = Checkpointer(d, config(), keep=2)
            if previous is None and ckpt.latest_step() is None:
                assert ckpt.all_steps() == [] and _debris(d) == []
                ckpt.close()
                seen.append((kill, round(delay, 3), None, left))
                continue  # killed before the first save finalized: nothing to restore
            restored, position = ckpt.restore(target, fallback=False)
        assert position in {previous, started}, (position, previous, started)
        assert ckpt.latest_step() == position
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state_at(base, position))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert _debris(d) == []  # opening the directory cleared what the kill left
        ckpt.close()
        seen.append((kill, round(delay, 3), position, left))
        finalized = position
    print("\n(kill, delay s, restored step, debris the kill left):\n" + "\n".join(map(str, seen)))
    assert sum(s[2] is not None for s in seen) >= KILLS - 1
    # the next save finalizes, reads back whole, and leaves nothing else behind
    with Checkpointer(d, config(), keep=2) as ckpt:
        nxt = (ckpt.latest_step() or 0) + 1
        assert ckpt.save(nxt, state_at(base, nxt), data_position=nxt)
        ckpt.wait()
        assert ckpt.readable_steps() == ckpt.all_steps() and ckpt.latest_step() == nxt
    assert _debris(d) == []
