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

A finalized step that cannot be read back (a file truncated, deleted or garbled after the
save) is reported as a :class:`~jlora.errors.CheckpointError` that names the step and the
directory; :meth:`Checkpointer.restore` then falls back to the newest step that reads, with a
:class:`CheckpointFallbackWarning` (or raises, with ``fallback=False``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from jlora import checkpoint_checks as C
from jlora.checkpoint_checks import adapter_shapes
from jlora.config import LoraConfig
from jlora.errors import CheckpointError, ConfigError
from jlora.train.state import abstract

# what orbax writes at the top of a step folder (an interrupted deletion of an old step
# leaves some of them: that folder is still a step)
_STEP_ENTRIES = frozenset({"state", "meta", "_CHECKPOINT_METADATA", "commit_success.txt"})


class CheckpointFallbackWarning(UserWarning):
    """:meth:`Checkpointer.restore` skipped newer steps that cannot be read (named in the
    message) and restored an older one."""


class _Unreadable(Exception):
    """A finalized step that cannot be read back (internal; surfaces as CheckpointError)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class Checkpointer:
    """Saves and restores a LoRA run's state with ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: where steps go (``<directory>/<step>/``); created if missing. It may hold
        other files, but no numbered folder that is not a checkpoint step.
      config: the run's :class:`~jlora.LoraConfig` (saved as JSON, checked on restore).
      keep: keep the last ``keep`` checkpoints (None: all).
      async_save: write in a background thread (call :meth:`wait` or :meth:`close`).
      save_interval_steps: :meth:`save` only writes steps that are multiples of this
        (unless ``force``); a positive int.
      model_id: an optional string naming the base model (e.g. its HF name); a checkpoint
        saved with another ``model_id`` is refused on restore.

    Raises:
      ConfigError: an argument of the wrong type or value (checked before anything is
        written).
      CheckpointError: ``directory`` is a file, cannot be created, or holds a numbered
        folder that orbax would take for a step but that is not one.

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
      ...     readable = ckpt.readable_steps()
      >>> position, ckpt.latest_step(), readable
      (1, 1, [1])
    """

    def __init__(self, directory: str | os.PathLike, config: LoraConfig, *,
                 keep: int | None = 3, async_save: bool = True, save_interval_steps: int = 1,
                 model_id: str | None = None):
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise ConfigError(f"directory={directory!r} must be a non-empty path (str or "
                              "os.PathLike) of the folder that holds the steps.")
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"config must be a jlora.LoraConfig, got {type(config).__name__}.")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"keep={keep!r} must be a positive int or None (keep all).")
        if not isinstance(async_save, bool):
            raise ConfigError(f"async_save={async_save!r} must be True or False.")
        save_interval_steps = C.count(save_interval_steps, "save_interval_steps", minimum=1)
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ConfigError(f"model_id={model_id!r} must be a non-empty string (e.g. the base "
                              "model's Hugging Face name) or None.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.model_id = model_id
        self._check_directory()
        self._unreadable: set[int] = set()  # steps this object found unreadable
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})
        except OSError as e:
            raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: "
                                  f"{C.why(e)}") from e

    def _check_directory(self) -> None:
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is a file; pass a "
                                  "folder (new or holding this run's steps).")
        if not os.path.isdir(self.directory):
            return
        # orbax takes every all-digit folder for a step, and deletes old ones (keep): refuse
        # folders that hold none of what a step holds, rather than delete a user's files
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.isdigit() and os.path.isdir(path):
                inside = os.listdir(path)
                if inside and not _STEP_ENTRIES & set(inside):
                    raise CheckpointError(
                        f"{path} looks like checkpoint step {int(name)} but is not one (it "
                        f"holds {sorted(inside)[:3]}...); Checkpointer would list it and may "
                        "delete it. Use a directory of its own for checkpoints.")

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps with a finalized checkpoint (half-written ones are never listed; a finalized
        step damaged on disk is listed: see :meth:`readable_steps`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        return self._manager.latest_step()

    def readable_steps(self) -> list[int]:
        """The finalized steps that read back whole: metadata, orbax's tree metadata and every
        array (each step is read in full onto one local CPU device, so this costs a restore
        per step; meant for inspection, not for every training step).

        Example:
          >>> import tempfile, jlora
          >>> Checkpointer(tempfile.mkdtemp(), jlora.LoraConfig(rank=2, targets=["q"])
          ...              ).readable_steps()
          []
        """
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        on_cpu = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)  # noqa: E731
        out = []
        for step in self.all_steps():
            try:
                self._read_meta(step)
                self._read_state(step, jax.tree.map(on_cpu, self._saved_metadata(step).tree))
            except _Unreadable:
                self._unreadable.add(step)
                continue
            out.append(step)
        return out

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a step: ``lora_config``, ``data_position``, ``adapters``
        (path -> shape), ``model_id``, ``step``.

        Raises:
          CheckpointError: no such finalized step, or its metadata cannot be read (the
            message names the step, the directory and why).
        """
        step = self._resolve(None if step is None else C.count(step, "step"))
        try:
            return self._read_meta(step)
        except _Unreadable as e:
            raise self._error(e) from e

    def _read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:  # noqa: BLE001 - a damaged step raises any of orbax's or json's
            raise _Unreadable(step, f"its metadata cannot be read ({C.why(e)})") from e
        problem = C.meta_problem(meta)
        if problem is not None:
            raise _Unreadable(step, problem)
        return dict(meta)

    def _saved_metadata(self, step: int) -> Any:
        """orbax's own metadata of the saved state (tree, shapes, dtypes)."""
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(step, f"orbax's metadata of its state cannot be read "
                                    f"({C.why(e)})") from e
        if saved is None:
            raise _Unreadable(step, "it holds no 'state' item")
        return saved

    def _read_state(self, step: int, target: Any) -> Any:
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(step, f"its arrays cannot be read ({C.why(e)})") from e
        return out["state"]

    def _error(self, e: _Unreadable, which: str = "checkpoint", hint: str = "") -> CheckpointError:
        return CheckpointError(f"{which} step {e.step} in {self.directory} cannot be read: "
                               f"{e.reason}.{hint}")

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, *, data_position: int | None = None,
             force: bool = False) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (asynchronously by default).

        A step at or below the latest finalized one is not saved (returns False). Steps from
        ``step`` on that :meth:`restore` or :meth:`readable_steps` found unreadable are
        deleted first: a run that fell back to an older step replaces them as it goes on.

        Args:
          step: the checkpoint's step number (e.g. how many train steps ran), an int >= 0.
          state: the :class:`~jlora.train.TrainState` (sharded arrays are fine).
          data_position: where the data iterator resumes (default ``step``), an int >= 0.
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
          Whether a save was started.

        Raises:
          ConfigError: ``step`` or ``data_position`` is not an int >= 0 (checked before any
            work).
          CheckpointError: ``force`` and ``step`` is already finalized.
        """
        step = C.count(step, "step")
        data_position = step if data_position is None else C.count(data_position,
                                                                  "data_position")
        if not isinstance(force, bool):
            raise ConfigError(f"force={force!r} must be True or False.")
        meta = {
            "format": C.FORMAT,
            "step": step,
            "data_position": data_position,
            "lora_config": json.loads(self.config.to_json()),
            "adapters": adapter_shapes(state),
            "model_id": self.model_id,
        }
        # this run goes on from an older step: newer ones that do not read are replaced
        for stale in sorted(s for s in self._unreadable if s >= step):
            if stale in self._manager.all_steps():
                self._manager.delete(stale)
            self._unreadable.discard(stale)
        try:
            return self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
                force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; "
                                  "a finalized step is never overwritten: save a later step."
                                  ) from e

    def restore(self, target: Any, step: int | None = None, *,
                fallback: bool = True) -> tuple[Any, int]:
        """Restores a step onto ``target``'s shapes, dtypes and shardings (any mesh).

        Args:
          target: a TrainState of arrays or ``jax.ShapeDtypeStruct``s with shardings (e.g.
            the fresh state of :func:`jlora.train.init` on the new mesh, or
            :func:`jlora.train.abstract` of it).
          step: the step to restore; default the latest finalized one.
          fallback: when ``step`` is None and the latest step cannot be read (a file
            truncated, deleted or garbled), restore the newest step that reads, with a
            :class:`CheckpointFallbackWarning` naming the skipped steps and why; False raises
            a :class:`~jlora.errors.CheckpointError` instead. A step named by ``step`` never
            falls back.

        Returns:
          ``(state, data_position)``.

        Raises:
          CheckpointError: no finalized checkpoint; no step that reads (each one named with
            why); or one saved with another LoraConfig, model_id, adapter set or optimizer
            state (the message names what differs: these never fall back).
        """
        if step is not None:
            step = C.count(step, "step")
        if not isinstance(fallback, bool):
            raise ConfigError(f"fallback={fallback!r} must be True or False.")
        steps = self.all_steps()
        chosen = self._resolve(step, steps)
        candidates = [chosen] if step is not None else sorted(steps, reverse=True)
        skipped: list[_Unreadable] = []
        for s in candidates:
            try:
                out = self._restore_step(s, target)
            except _Unreadable as e:
                self._unreadable.add(s)
                if step is not None:
                    raise self._error(e, hint=f" Finalized steps: {steps}; restore another "
                                              "with step=...") from e
                if not fallback:
                    older = [x for x in steps if x < s]
                    hint = (f" Older steps: {older}; restore(..., fallback=True) restores the "
                            "newest one that reads." if older else " There is no older step.")
                    raise self._error(e, "the latest checkpoint", hint) from e
                skipped.append(e)
                continue
            if skipped:
                warnings.warn(CheckpointFallbackWarning(
                    f"restored checkpoint step {s} of {self.directory}, not the newer "
                    f"{C.listed([f'step {e.step} ({e.reason})' for e in skipped])}, which cannot "
                    "be read. They stay on disk until this run saves those steps again."),
                    stacklevel=2)
            return out
        raise CheckpointError(f"no checkpoint step in {self.directory} can be read: "
                              f"{C.listed([f'step {e.step}: {e.reason}' for e in skipped])}.")

    def _restore_step(self, step: int, target: Any) -> tuple[Any, int]:
        where = f"checkpoint {self.directory}/{step}"
        meta = self._read_meta(step)
        try:
            saved_cfg = LoraConfig.from_json(meta["lora_config"])
        except Exception as e:  # noqa: BLE001 - a LoraConfig this version cannot read
            raise _Unreadable(step, f"its LoraConfig cannot be read ({C.why(e)})") from e
        diff = C.config_diff(saved_cfg, self.config)
        if diff:
            raise CheckpointError(f"{where} was saved with another LoraConfig: "
                                  f"{'; '.join(diff)}. Restore with the config it was trained "
                                  "with, or start a new run in a new directory.")
        if self.model_id is not None and meta["model_id"] not in (None, self.model_id):
            raise CheckpointError(f"{where} was saved for model {meta['model_id']!r}, not "
                                  f"{self.model_id!r}.")
        diff = C.tree_diff(meta["adapters"], adapter_shapes(target), "this run's model")
        if diff:
            raise CheckpointError(f"{where} holds adapters for a different model: "
                                  f"{C.listed(diff)}.")
        goal = abstract(target)
        diff = C.tree_diff(C.skeleton(self._saved_metadata(step).tree), C.skeleton(goal),
                          "this run's state")
        if diff:
            opt = all(d.startswith("opt_state") for d in diff)
            what = ("another optimizer state than this run's (was it saved with another optax "
                    "transform?)" if opt else "another training state than this run's")
            raise CheckpointError(f"{where} holds {what}: {C.listed(diff, 8)}. Restore with the "
                                  "optimizer it was trained with, or start a new run in a new "
                                  "directory.")
        return self._read_state(step, goal), meta["data_position"]

    def _resolve(self, step: int | None, steps: list[int] | None = None) -> int:
        steps = self.all_steps() if steps is None else steps
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
