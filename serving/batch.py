"""What the scheduler hands the model runner: one ragged batch of chunks for one forward pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScheduledChunk:
    """The tokens one sequence feeds into this forward pass.

    A decode step is a chunk of one token; a prompt (or a recomputed sequence) is fed as one or more
    chunks across passes. Positions start at `start_pos` (= tokens already in the KV cache), and the
    new tokens' keys/values are written to the slots given by `block_table` (block ids, in order,
    covering at least start_pos + len(token_ids) tokens).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool  # True for decode chunks and for the last chunk of a prompt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
