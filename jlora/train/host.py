"""Host memory for XLA:CPU: keep the step's temporaries mapped from one step to the next.

XLA:CPU allocates one buffer for all of a compiled step's temporaries at every execution
(1.25 GB for the MiniLM step of ``make demo``) and frees it at the end. glibc serves such a
request from a fresh ``mmap`` (the worker threads' arenas cannot hold it) and unmaps it on
free, so every step touches fresh pages: 300k page faults and about 0.3 s of a 1.4 s step
on 2 cores. With one arena, no mmap for large blocks and no trimming, the freed block stays
mapped and the next step reuses it (0 faults; the step takes 1.09 s). PyTorch's allocator
does not need it (measured: no gain). The settings are process-wide and must be in place
before the first JAX computation starts XLA's threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - a jax without the helper
        return False


def reuse_host_memory() -> bool:
    """Makes glibc keep freed host memory mapped, so XLA:CPU reuses a step's temporaries.

    Call it once, before the first JAX computation (the ``jlora`` command does). It sets
    glibc's ``M_ARENA_MAX=1``, ``M_MMAP_MAX=0`` and ``M_TRIM_THRESHOLD=-1`` (no trimming
    at all: a largest-int threshold still let a step whose freed blocks add up to more than
    2 GiB give them back, and fault them in again the next step; 450k faults per step of
    the 58M-param full fine-tuning benchmark): the process then keeps its peak host memory
    instead of returning it. A no-op (returning False) on other C libraries and platforms,
    or once JAX's backends have started (it would no longer reach XLA's threads; logged).

    Returns:
      Whether the settings are in place.

    Example:
      >>> import jlora
      >>> isinstance(jlora.train.reuse_host_memory(), bool)
      True
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    if _backends_started():
        logger.info("reuse_host_memory: JAX's backends have started already; call it before "
                    "the first JAX computation for it to take effect")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok = all(mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    _applied = ok
    return ok


__all__ = ["reuse_host_memory"]
