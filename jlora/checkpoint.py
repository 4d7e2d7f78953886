"""Adapter-only training checkpoints with orbax's CheckpointManager.

A checkpoint holds the :class:`~jlora.train.TrainState` (adapters, optimizer state, step, rng,
non-finite counters), the data position and, as JSON metadata, the :class:`~jlora.LoraConfig`
and the adapters' paths and shapes; never the frozen base. Saves are asynchronous (the step
goes on while orbax writes), keep the last N, and are atomic: orbax writes
``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` once every process has
finished, so a run killed mid-save leaves only a temporary directory, which is never listed
or restored (and is removed when the next manager opens the directory). Restores go onto
any mesh: the target state's shardings decide the layout. In a multi-host run every process
calls :meth:`Checkpointer.save` and :meth:`Checkpointer.restore`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jlora import paths as P
from jlora.config import LoraConfig
from jlora.errors import CheckpointError, ConfigError
from jlora.train.state import abstract

_FORMAT = "jlora-train-1"


def adapter_shapes(state: Any) -> dict[str, list[int]]:
    """``{dotted path: shape}`` of the adapters in a TrainState (or a trainable tree)."""
    params = getattr(state, "params", state)
    return {p: list(np.shape(x)) for p, x in P.leaves_with_paths(params) if x is not None}


def _config_diff(saved: LoraConfig, mine: LoraConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(LoraConfig):
        a, b = getattr(saved, f.name), getattr(mine, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r} vs this run {b!r}")
    return out


def _shape_diff(saved: dict[str, list[int]], mine: dict[str, list[int]]) -> list[str]:
    out = [f"{p}: only in the checkpoint" for p in sorted(set(saved) - set(mine))]
    out += [f"{p}: only in this run's model" for p in sorted(set(mine) - set(saved))]
    out += [f"{p}: shape {tuple(saved[p])} in the checkpoint vs {tuple(mine[p])} here"
            for p in sorted(set(saved) & set(mine)) if list(saved[p]) != list(mine[p])]
    return out


class Checkpointer:
    """Saves and restores a LoRA run's state with ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: where steps go (``<directory>/<step>/``); created if missing.
      config: the run's :class:`~jlora.LoraConfig` (saved as JSON, checked on restore).
      keep: keep the last ``keep`` checkpoints (None: all).
      async_save: write in a background thread (call :meth:`wait` or :meth:`close`).
      save_interval_steps: :meth:`save` only writes steps that are multiples of this
        (unless ``force``).
      model_id: an optional string naming the base model (e.g. its HF name); a checkpoint
        saved with another ``model_id`` is refused on restore.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
      >>> from jlora.train import init
      >>> cfg = jlora.LoraConfig(rank=2, targets=["q"])
      >>> p = jlora.inject({"q": {"kernel": jnp.ones((8, 4))}}, cfg, jax.random.key(0))
      >>> state, frozen, sh = init(p, optax.adam(1e-3), jax.random.key(1))
      >>> with Checkpointer(tempfile.mkdtemp(), cfg, keep=2) as ckpt:
      ...     _ = ckpt.save(1, state, data_position=1)
      ...     ckpt.wait()
      ...     restored, position = ckpt.restore(state)
      >>> position, ckpt.latest_step()
      (1, 1)
    """

    def __init__(self, directory: str | os.PathLike, config: LoraConfig, *,
                 keep: int | None = 3, async_save: bool = True, save_interval_steps: int = 1,
                 model_id: str | None = None):
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"config must be a jlora.LoraConfig, got {type(config).__name__}.")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"keep={keep!r} must be a positive int or None (keep all).")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.model_id = model_id
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps with a finalized checkpoint (half-written ones are never listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        return self._manager.latest_step()

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a step: ``lora_config``, ``data_position``, ``adapters``
        (path -> shape), ``model_id``, ``step``."""
        return self._read_meta(self._resolve(step))

    def _read_meta(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, *, data_position: int | None = None,
             force: bool = False) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (asynchronously by default).

        Args:
          step: the checkpoint's step number (e.g. how many train steps ran).
          state: the :class:`~jlora.train.TrainState` (sharded arrays are fine).
          data_position: where the data iterator resumes (default ``step``).
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
          Whether a save was started.
        """
        meta = {
            "format": _FORMAT,
            "step": int(step),
            "data_position": int(step if data_position is None else data_position),
            "lora_config": json.loads(self.config.to_json()),
            "adapters": adapter_shapes(state),
            "model_id": self.model_id,
        }
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores a step onto ``target``'s shapes, dtypes and shardings (any mesh).

        Args:
          target: a TrainState of arrays or ``jax.ShapeDtypeStruct``s with shardings (e.g.
            the fresh state of :func:`jlora.train.init` on the new mesh, or
            :func:`jlora.train.abstract` of it).
          step: the step to restore; default the latest finalized one.

        Returns:
          ``(state, data_position)``.

        Raises:
          CheckpointError: no finalized checkpoint, or one saved with another LoraConfig,
            model_id or adapter set (the message names the mismatch).
        """
        step = self._resolve(step)
        meta = self._read_meta(step)
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{self.directory}/{step} is not a jlora training checkpoint "
                                  f"(format {meta.get('format')!r}, expected {_FORMAT!r}).")
        saved_cfg = LoraConfig.from_json(meta["lora_config"])
        diff = _config_diff(saved_cfg, self.config)
        if diff:
            raise CheckpointError(f"checkpoint {self.directory}/{step} was saved with another "
                                  f"LoraConfig: {'; '.join(diff)}. Restore with the config it "
                                  "was trained with, or start a new run in a new directory.")
        if self.model_id is not None and meta.get("model_id") not in (None, self.model_id):
            raise CheckpointError(f"checkpoint {self.directory}/{step} was saved for model "
                                  f"{meta['model_id']!r}, not {self.model_id!r}.")
        diff = _shape_diff(meta["adapters"], adapter_shapes(target))
        if diff:
            more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
            raise CheckpointError(f"checkpoint {self.directory}/{step} holds adapters for a "
                                  f"different model: {'; '.join(diff[:5])}{more}.")
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(target))))
        return out["state"], int(meta["data_position"])

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no finalized checkpoint in {self.directory} (a "
                                      "half-written save is never restored).")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no finalized checkpoint for step {step} in "
                                  f"{self.directory}; finalized steps: {steps}.")
        return step

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
