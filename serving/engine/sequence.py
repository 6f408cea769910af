"""One request's state inside the engine: its tokens, KV blocks, progress and random generator."""

from __future__ import annotations

import enum
import math

import torch

from serving.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and queued again for recompute
    RUNNING = "running"      # admitted: holds KV blocks, gets chunks every pass
    FINISHED = "finished"


class Sequence:
    """Prompt ids + generated ids, how many of them are in the KV cache, and the block table.

    Tokens [0, num_computed_tokens) have keys/values in the cache. A sequence whose only uncomputed
    token is its last sampled one is decoding; anything else left to compute is a prompt chunk (a
    fresh prompt, or prompt + generated tokens after preemption by recompute).
    """

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator, max_model_len: int, block_size: int):
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[list[tuple[int, float]]] = []   # per token, when params.top_logprobs
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []          # chained hashes of the computed full blocks
        self.prefix_caching = True                 # False after a cache reset while it ran
        self.num_preemptions = 0
        self.max_total_tokens = min(len(prompt_token_ids) + params.max_new_tokens, max_model_len)
        self.max_blocks = math.ceil(self.max_total_tokens / block_size)   # worst-case KV need
        self.detokenizer = None                    # serving.engine.detokenizer.IncrementalDetokenizer, set by the engine
        self.num_emitted_tokens = 0                # tokens already reported in an output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output, without building the whole list when avoidable."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    def append_token(self, token_id: int, logprob: float) -> None:
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprob)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, prompt={len(self.prompt_token_ids)}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
