"""What the engine hands back: per-request outputs (deltas + totals) and engine statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One request's progress after a step: what is new since its previous output, and everything so far.

    Concatenating every `new_text` of a request gives its final `text` (stop strings are cut and
    never leaked into a delta). `logprobs` are of the sampled tokens under the raw model distribution, or the
    processed one (params.logprobs_mode, serving.engine.sampler).
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_text: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool
    finish_reason: str | None     # "stop" | "length" | "abort" | None while running
    weight_version: int
    error: str | None = None      # why a request ended as "abort" (bad numbers, a weight swap's deadline)

    def after(self, earlier: RequestOutput) -> RequestOutput:
        """This output merged with an `earlier` one nobody has read yet: the deltas of both, the totals of this."""
        return dataclasses.replace(self, new_token_ids=earlier.new_token_ids + self.new_token_ids,
                                   new_logprobs=earlier.new_logprobs + self.new_logprobs,
                                   new_text=earlier.new_text + self.new_text,
                                   new_top_logprobs=earlier.new_top_logprobs + self.new_top_logprobs)
    # params.top_logprobs most likely (token id, logprob) pairs per generated token ([] when not asked)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    token_budget: int
    requests_finished: int
    tokens_generated: int
    max_model_len: int
