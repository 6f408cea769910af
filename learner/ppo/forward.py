"""The forward passes of step 3 over a batch laid out as [left pad | prompt | response | right pad].

Only response tokens are scored, so the LM head runs on the response positions alone (`logits_to_keep`:
on a 128+128 batch of a small vocabulary model that is about a fifth of a forward pass), and experience
forwards run in length-sorted chunks cut to their own longest prompt (`ChunkPlan`), so the body of the
model does no work on the left padding a batch's longest prompt imposes on the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from learner import ds
from learner.ppo import math as pm
from learner.ppo.experience import position_ids
from learner.ppo.processing import LogitProcessing


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int = 1,
                      processing: LogitProcessing | None = None):
    """log p(token i+1 | tokens <= i) under a causal LM, [B, L - 1] float32, for i >= prompt_width - 1
    (the response); the positions before are 0. prompt_width 1 scores every position. With `processing`, the
    pair (those raw logprobs, the ones under the sampled distribution: learner.ppo.processing) of one forward."""
    keep = input_ids.shape[1] - prompt_width + 1                 # logits of positions P-1 .. L-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False, logits_to_keep=keep).logits[:, :-1]
    labels = input_ids[:, prompt_width:]
    raw = F.pad(pm.logprobs_from_logits(logits, labels), (prompt_width - 1, 0))
    if processing is None:
        return raw
    return raw, F.pad(processing.logprobs(logits, labels), (prompt_width - 1, 0))


def sequence_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int = 1) -> torch.Tensor:
    """The critic's value of each state that emits token i+1, [B, L - 1]."""
    return model(input_ids, attention_mask, position_ids(attention_mask))[:, :-1]


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int = 1) -> torch.Tensor:
    """The reward model's score at the last real token of each row, [B]."""
    return ds.unwrap(model).score(input_ids, attention_mask, position_ids(attention_mask))


Forward = Callable[..., torch.Tensor]


@dataclass
class ChunkPlan:
    """Rows sorted by prompt length, cut into chunks of at most `rows`; each chunk drops the columns of left
    padding all its rows share. `run` gives the same [B, ...] result as one forward over the whole batch
    (rows in their original order, 0 on the dropped columns)."""

    order: torch.Tensor             # rows, shortest prompt first
    chunks: list[tuple[int, int, int]]   # (first, end) into order, and the chunk's first kept column

    @classmethod
    def in_order(cls, batch: int, rows: int) -> ChunkPlan:
        """Chunks of `rows` rows in batch order, every column kept."""
        return cls(torch.arange(batch), [(first, min(first + rows, batch), 0) for first in range(0, batch, rows)])

    @classmethod
    def make(cls, attention_mask: torch.Tensor, prompt_width: int, rows: int) -> ChunkPlan:
        """Length-sorted chunks of `rows` rows, each cut to its own longest prompt."""
        batch = attention_mask.shape[0]
        prompt_len = attention_mask[:, :prompt_width].sum(1).cpu()
        order = torch.argsort(prompt_len, stable=True)
        chunks = []
        for first in range(0, batch, rows):
            end = min(first + rows, batch)
            longest = int(prompt_len[order[first:end]].max())
            chunks.append((first, end, prompt_width - longest))
        return cls(order, chunks)

    def run(self, fn: Forward, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
            **kwargs):
        """fn over every chunk, merged back into batch order (a tuple result: each of its tensors)."""
        parts = []
        for first, end, start in self.chunks:
            index = self.order[first:end].to(input_ids.device)
            parts.append(fn(model, input_ids[index, start:], attention_mask[index, start:], prompt_width - start,
                            **kwargs))
        if isinstance(parts[0], tuple):
            return tuple(self._merge([p[i] for p in parts]) for i in range(len(parts[0])))
        return self._merge(parts)

    def _merge(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if pieces[0].dim() > 1:                                    # per-token: put back the dropped columns
            pieces = [F.pad(piece, (start, 0)) for piece, (_, _, start) in zip(pieces, self.chunks)]
        merged = torch.cat(pieces)
        result = torch.empty_like(merged)
        result[self.order.to(merged.device)] = merged
        return result
