"""A training run that checkpoints every step (run by test_resume.py, not collected).

Usage: python _resume_worker.py CKPT_DIR TOTAL_STEPS OUT_JSONL [KILL_AFTER_SAVE]
Resumes from the latest finalized checkpoint in CKPT_DIR if there is one, appends one JSON
line per step to OUT_JSONL, saves asynchronously after every step and, with
KILL_AFTER_SAVE=k, sends itself SIGKILL right after starting the save of step k.
"""

from __future__ import annotations

import json
import os
import signal
import sys

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
ACCUM = 2


def build():
    """``(state, frozen, shardings, step)`` of the run (also used for the reference run)."""
    import jax
    import optax
    from _jtrain_util import make_params

    import jlora.train as T

    model, params = make_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    state, frozen, sh = T.init(params, tx, jax.random.key(0), mesh=T.make_mesh(MESH))
    loss = T.causal_lm_loss(model.apply)
    return state, frozen, sh, T.make_train_step(loss, tx, sh, accum_steps=ACCUM)


def main(ckpt_dir: str, total: int, out: str, kill_after: int | None) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from _jtrain_util import CONFIG, data

    import jlora.train as T
    from jlora.checkpoint import Checkpointer

    state, frozen, sh, step = build()
    ckpt = Checkpointer(ckpt_dir, CONFIG, keep=3, async_save=True)
    position = 0
    if ckpt.latest_step() is not None:
        state, position = ckpt.restore(state)
    it = T.DataIterator(data(), position)
    with open(out, "a") as f:
        f.write(json.dumps({"resumed_from": position}) + "\n")
        for s in range(position, total):
            state, m = step(state, frozen, T.shard_batch(next(it), sh.batch, multiple=ACCUM))
            f.write(json.dumps({"step": s, "loss": float(m["loss"])}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            ckpt.save(s + 1, state, data_position=it.position)
            if kill_after is not None and s + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # mid async save
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3],
         int(sys.argv[4]) if len(sys.argv) > 4 else None)
