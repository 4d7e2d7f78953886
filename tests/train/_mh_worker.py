"""One process of the multi-host test (run by test_multihost.py, not collected by pytest).

Usage: python _mh_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT_JSON
Process 0 starts jax.distributed from arguments, the others from the environment variables
the parent sets. Each process has 2 CPU devices (XLA_FLAGS set by the parent); the processes train 5 steps
on a (data=1, fsdp=2, tensor=2) mesh, save one orbax checkpoint from every process, restore
it, and write their losses and checks to OUT_JSON.
"""

from __future__ import annotations

import json
import sys


def main(pid: int, n: int, port: int, ckpt_dir: str, out: str) -> None:
    import jax

    import jlora.train as T

    if pid == 0:  # from arguments
        T.initialize(f"127.0.0.1:{port}", n, pid, timeout_s=120)
    else:  # from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
        T.initialize(timeout_s=120)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import optax
    from _jtrain_util import CONFIG, data, make_params

    from jlora.checkpoint import Checkpointer

    assert jax.process_count() == n and jax.device_count() == 2 * n
    model, params = make_params()
    tx = optax.adamw(1e-2)
    mesh = T.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    state, frozen, sh = T.init(params, tx, jax.random.key(0), mesh=mesh)
    step = T.make_train_step(T.causal_lm_loss(model.apply), tx, sh, accum_steps=2)
    it = T.DataIterator(data(), 0)
    losses = []
    for _ in range(5):
        state, m = step(state, frozen, T.shard_batch(next(it), sh.batch, multiple=2))
        losses.append(float(m["loss"]))
    with Checkpointer(ckpt_dir, CONFIG, keep=2) as ckpt:
        ckpt.save(5, state, data_position=it.position)
        ckpt.wait()
        fresh, _, _ = T.init(params, tx, jax.random.key(0), mesh=mesh)
        restored, position = ckpt.restore(fresh)
    same = all(
        np.array_equal(np.asarray(a.addressable_data(0)), np.asarray(b.addressable_data(0)))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
    with open(out, "w") as f:
        json.dump({"losses": losses, "position": position, "restored_equal": same,
                   "trace_count": step.trace_count, "steps": int(restored.step)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
