"""A tiny deterministic data source that can resume from a position (for tests and demos)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jlora.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SyntheticTokens:
    """Random token batches, a pure function of ``(seed, position)``.

    ``batch(position)`` is the global batch number ``position``: ``input_ids`` (int32,
    ``(batch_size, seq_len)``) and an ``attention_mask`` whose rows are right-padded to
    random lengths in ``[min_len, seq_len]``.

    Example:
      >>> data = SyntheticTokens(vocab_size=11, seq_len=6, batch_size=2, seed=0)
      >>> b = data.batch(3)
      >>> b["input_ids"].shape, bool((b["input_ids"] == data.batch(3)["input_ids"]).all())
      ((2, 6), True)
    """

    vocab_size: int
    seq_len: int
    batch_size: int
    seed: int = 0
    min_len: int | None = None

    def __post_init__(self):
        for f in ("vocab_size", "seq_len", "batch_size"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}={getattr(self, f)!r} must be >= 1.")

    def batch(self, position: int) -> dict[str, np.ndarray]:
        """The global batch at ``position`` (same on every process)."""
        rng = np.random.default_rng([self.seed, int(position)])
        ids = rng.integers(0, self.vocab_size, (self.batch_size, self.seq_len), dtype=np.int32)
        lo = self.seq_len if self.min_len is None else self.min_len
        lengths = rng.integers(lo, self.seq_len + 1, (self.batch_size,))
        mask = (np.arange(self.seq_len)[None, :] < lengths[:, None]).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask}


class DataIterator(Iterator[Any]):
    """Iterates ``source(position)`` for ``position = start, start + 1, ...``.

    ``position`` is the index of the next batch: save it with a checkpoint and resume with
    ``DataIterator(source, position=saved)``.

    Example:
      >>> it = DataIterator(lambda i: i * 10, position=2)
      >>> next(it), next(it), it.position
      (20, 30, 4)
    """

    def __init__(self, source: Callable[[int], Any] | SyntheticTokens, position: int = 0):
        self.source = source.batch if isinstance(source, SyntheticTokens) else source
        if isinstance(position, bool) or not isinstance(position, int | np.integer) \
                or position < 0:
            raise ConfigError(f"position={position!r} must be a non-negative int.")
        self.position = int(position)

    def __next__(self) -> Any:
        out = self.source(self.position)
        self.position += 1
        return out
