"""An endless, seeded stream of prompt batches for PPO rollouts, sharded across ranks.

Its position is the number of batches taken: `state_dict()` goes into a resumable checkpoint and
`load_state_dict()` replays the seeded order up to it, so a resumed run draws the prompts the uninterrupted
one would have (the same on every rank, so rank 0's checkpoint state serves all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError
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
        self.taken = 0                  # batches handed out by next_batch

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
        self.taken += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_taken": self.taken, "batch_size": self.batch_size, "prompts": len(self.dataset),
                "seed": self.seed, "world_size": ds.world_size()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["batches_taken"]` batches of the same seeded order (a peeked batch is dropped)."""
        mine = self.state_dict()
        for key, field in (("batch_size", "rollout_batch_size"), ("prompts", "data"), ("seed", "seed"),
                           ("world_size", "num_ranks")):
            if key in state and state[key] != mine[key]:
                raise ConfigError(field, f"the checkpoint drew prompts with {key} {state[key]}, this run has "
                                         f"{mine[key]}: resume with the same {field} (or start afresh)")
        self.epoch, self._queue, self._next = 0, [], None
        for _ in range(int(state["batches_taken"])):
            self._take()
        self.taken = int(state["batches_taken"])

    def peek(self) -> PromptBatch:
        """The batch next_batch will return, without taking it (a remote source prefetches it)."""
        if self._next is None:
            self._next = self._draw()
        return self._next

    def _take(self) -> list[int]:
        while len(self._queue) < self.batch_size:
            self._refill()
        take, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        return take

    def _draw(self) -> PromptBatch:
        take = self._take()
        return PromptBatch(ids=[self.dataset[i]["input_ids"].tolist() for i in take],
                           texts=[self.dataset.sample(i).prompt for i in take])
