"""Multi-host start-up: ``jax.distributed`` from arguments or the environment."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from jlora.errors import MeshError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise MeshError(f"environment variable {name}={v!r} must be an integer.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               cpu_collectives: str | None = "gloo", timeout_s: int | None = None) -> bool:
    """Starts ``jax.distributed`` so that every host runs the same SPMD program.

    Arguments win over the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``); with neither, JAX's own cluster detection (SLURM, TPU pods...)
    is used. Must run before any other JAX call touches the devices. Calling it again
    (already initialised) does nothing. A single process (``num_processes=1`` or nothing
    configured outside a cluster) runs without the distributed service.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      cpu_collectives: CPU collectives backend (``"gloo"``, ``"mpi"``), set on
        ``jax_cpu_collectives_implementation`` for multi-process CPU runs; None leaves it.
      timeout_s: the coordinator's initialization timeout.

    Returns:
      True when this call started the distributed runtime.

    Raises:
      MeshError: an incomplete or inconsistent configuration.

    Example:
      >>> initialize(num_processes=1)  # one process: nothing to start
      False

    On each of two hosts (``process_id`` 0 and 1)::

      jlora.train.initialize("10.0.0.1:1234", num_processes=2, process_id=i)
    """
    from jax._src import distributed as _dist

    if _dist.global_state.client is not None:
        return False
    addr = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    n = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if addr is None and n is None and pid is None:
        try:
            jax.distributed.initialize()  # cluster auto-detection
            return True
        except (ValueError, RuntimeError):
            return False  # not in a cluster: one process
    if n == 1 and addr is None:
        return False
    if addr is None or n is None or pid is None:
        raise MeshError(
            f"jax.distributed needs coordinator_address, num_processes and process_id (got "
            f"{addr!r}, {n!r}, {pid!r}); pass them or set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}.")
    if not 0 <= pid < n:
        raise MeshError(f"process_id={pid} must be in [0, num_processes={n}).")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kw = {} if timeout_s is None else {"initialization_timeout": timeout_s}
    jax.distributed.initialize(addr, num_processes=n, process_id=pid,
                               local_device_ids=local_device_ids, **kw)
    return True
