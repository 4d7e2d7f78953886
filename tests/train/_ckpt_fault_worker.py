"""Saves checkpoints in a loop until SIGKILL (run by test_checkpoint_faults.py, not collected).

Usage: python _ckpt_fault_worker.py CKPT_DIR FIRST_STEP KILL_AFTER_S LOG

Opens a Checkpointer on CKPT_DIR, then saves steps FIRST_STEP, FIRST_STEP + 1, ... (async,
each waited for), the state of step k being :func:`state_at` k; appends ``start k`` before
and ``done k`` after each save to LOG. A timer thread sends SIGKILL KILL_AFTER_S seconds after
the first save starts, wherever the saves are then.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

MAX_STEPS = 500


def base_state():
    """A small TrainState (adapters, adam moments, counters), the same in every process;
    built from NumPy without compiling anything, so that a worker starts fast."""
    import numpy as np
    import optax

    from jlora.train import TrainState

    rng = np.random.default_rng(0)
    params = {
        f"layer_{i}": {
            "kernel_lora_a": rng.standard_normal((32, 4), np.float32),
            "kernel_lora_b": rng.standard_normal((4, 16), np.float32),
        }
        for i in range(4)
    }
    count = np.zeros((), np.int32)
    moments = lambda: {
        k: {n: np.zeros_like(x) for n, x in v.items()}  # noqa: E731
        for k, v in params.items()
    }
    state = TrainState(
        step=count,
        params=params,
        opt_state=(optax.ScaleByAdamState(count, moments(), moments()), optax.EmptyState()),
        rng=np.zeros((2,), np.uint32),
        bad_streak=count,
        skipped=count,
    )
    return state


def config():
    import jlora

    return jlora.LoraConfig(rank=4, alpha=8, targets=".*")


def state_at(state, step: int):
    """Step ``step``'s state: every float leaf moved by ``step``, every int leaf set to it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    return jax.tree.map(
        lambda x: jnp.asarray(x + step if x.dtype == np.float32 else np.full_like(x, step)), state
    )


def main(ckpt_dir: str, first: int, kill_after: float, log: str) -> None:
    from jlora.checkpoint import Checkpointer

    state = base_state()
    ckpt = Checkpointer(ckpt_dir, config(), keep=2, async_save=True)
    timer = threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL))
    with open(log, "a", buffering=1) as f:
        timer.start()
        for step in range(first, first + MAX_STEPS):
            f.write(f"start {step}\n")
            ckpt.save(step, state_at(state, step), data_position=step)
            ckpt.wait()
            f.write(f"done {step}\n")
    sys.exit(3)  # never killed


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
