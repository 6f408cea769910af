"""The most likely tokens at each sampled position, for requests that ask for them (`top_logprobs`).

They are under the same distribution as the sampled token's own logprob (its request's
`logprobs_mode`, serving.engine.sampler), so a client can compare the two directly: by default the RAW
model distribution (log_softmax of the fp32 logits: temperature 1, no top-k/top-p); with "processed",
the distribution the token was drawn from, whose tokens outside the top-k/top-p set have probability 0:
those are left out, so such a position can list fewer than `top_logprobs` tokens.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence


def top_logprobs(logits: torch.Tensor, seqs: list[Sequence], processed: dict[int, torch.Tensor] | None = None
                 ) -> list[list[tuple[int, float]]] | None:
    """Row i: the max(top_logprobs) most likely (token id, logprob) pairs, best first; None when no
    sequence of the batch asked (the common case costs nothing). `processed`: row -> its log-probabilities
    under the processed distribution (the sampler's), used instead of the raw ones for that row."""
    k = max((s.params.top_logprobs for s in seqs), default=0)
    if k == 0:
        return None
    k = min(k, logits.shape[-1])
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    out = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    for i, row in (processed or {}).items():
        if seqs[i].params.top_logprobs:
            row_values, row_ids = torch.topk(row, k)
            out[i] = [(t, v) for t, v in zip(row_ids.tolist(), row_values.tolist()) if v != float("-inf")]
    return out
