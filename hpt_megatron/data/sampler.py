"""A resumable prompt sampler: batches of indices, reshuffled by (seed, epoch) every epoch.

The order is a pure function of (seed, epoch, position), so the state is three integers plus the
settings they depend on; a run restored from ``state_dict()`` yields exactly the batches an
uninterrupted run would have yielded next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class PromptSampler(Iterator[list[int]]):
    """Endless iterator over batches of ``batch_size`` prompt indices, epoch after epoch.

    shuffle: a fresh permutation per epoch, seeded by (seed, epoch); False keeps file order.
    drop_last: skip an epoch's final partial batch (every batch then has exactly batch_size prompts).
    """

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be a non-negative integer")
        if num_examples < (batch_size if drop_last else 1):
            raise ValueError(
                f"{num_examples} prompts cannot fill one batch of {batch_size}; use more "
                "data, a smaller batch, or drop_last=False"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.cursor = 0  # position within the current epoch's order
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
        return self._order

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self._order = None

    def __next__(self) -> list[int]:
        left = self.num_examples - self.cursor
        if left == 0 or (self.drop_last and left < self.batch_size):
            self._next_epoch()
        order = self._epoch_order()
        batch = order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(batch)
        return batch.tolist()

    def __iter__(self) -> PromptSampler:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the settings must match, or the restored order would differ."""
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}; resume with the same data and settings"
                )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = None
