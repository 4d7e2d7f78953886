"""Sharded LoRA training: meshes and partition rules, the train state and step, data.

The same code runs on one CPU, on 8 simulated devices and on many hosts under
``jax.distributed``::

    mesh = jlora.train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(0), mesh=mesh)
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(model.apply), tx, sh)
    for batch in data:
        state, metrics = step(state, frozen, jlora.train.shard_batch(batch, sh.batch))

Checkpoints: :class:`jlora.checkpoint.Checkpointer`.
"""

from jlora.train.data import DataIterator, SyntheticTokens
from jlora.train.distributed import initialize
from jlora.train.host import reuse_host_memory
from jlora.train.loss import IGNORE_INDEX, causal_lm_loss
from jlora.train.mesh import (
    AXES,
    BATCH_AXES,
    DEFAULT_RULES,
    batch_sharding,
    make_mesh,
    param_specs,
    put,
    shard_batch,
    single_device_mesh,
)
from jlora.train.precision import Precision
from jlora.train.state import Shardings, TrainState, abstract, init
from jlora.train.step import TrainStep, make_train_step

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "IGNORE_INDEX",
    "DataIterator",
    "Precision",
    "Shardings",
    "SyntheticTokens",
    "TrainState",
    "TrainStep",
    "abstract",
    "batch_sharding",
    "causal_lm_loss",
    "init",
    "initialize",
    "make_mesh",
    "make_train_step",
    "param_specs",
    "put",
    "reuse_host_memory",
    "shard_batch",
    "single_device_mesh",
]
