"""An endless, seeded stream of prompt batches for PPO rollouts, sharded across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner import ds
from learner.data import PromptDataset


@dataclass
class PromptBatch:
    ids: list[list[int]]                # token ids of each prompt (no padding)
    texts: list[str]                    # the prompt strings they came from (for the gold judge)


class PromptStream:
    """Each epoch is a fresh seeded permutation of the dataset; rank r takes every world-th prompt of it
    (padded by wrapping so all ranks see as many), and batches run on across epoch boundaries."""

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int):
        if len(dataset) == 0:
            raise ValueError("no usable PPO prompts")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self._queue = 0, []
        self._next: PromptBatch | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _refill(self) -> None:
        n, world = len(self.dataset), ds.world_size()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = -(-n // world) * world
        order = (order * (total // n + 1))[:total]
        self._queue.extend(order[ds.rank()::world])
        self.epoch += 1

    def next_batch(self) -> PromptBatch:
        batch, self._next = self._next or self._draw(), None
        return batch

    def peek(self) -> PromptBatch:
        """The batch next_batch will return, without taking it (a remote source prefetches it)."""
        if self._next is None:
            self._next = self._draw()
        return self._next

    def _draw(self) -> PromptBatch:
        while len(self._queue) < self.batch_size:
            self._refill()
        take, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        return PromptBatch(ids=[self.dataset[i]["input_ids"].tolist() for i in take],
                           texts=[self.dataset.sample(i).prompt for i in take])
