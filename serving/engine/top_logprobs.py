"""The most likely tokens at each sampled position, for requests that ask for them (`top_logprobs`).

Like the sampled token's own logprob, these are under the RAW model distribution (log_softmax of the
fp32 logits: temperature 1, no top-k/top-p), so a client can compare them with it directly.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence


def top_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> list[list[tuple[int, float]]] | None:
    """Row i: the max(top_logprobs) most likely (token id, logprob) pairs, best first; None when no
    sequence of the batch asked (the common case costs nothing)."""
    k = max((s.params.top_logprobs for s in seqs), default=0)
    if k == 0:
        return None
    k = min(k, logits.shape[-1])
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
