"""Turn a batch of logits into next tokens: greedy (vectorised), temperature, top-k, top-p.

The returned logprob of each sampled token is under the RAW model distribution (log_softmax of the
fp32 logits, temperature 1, no top-k/top-p, no masking): the learner uses it as the behaviour
logprob. Sampled rows use their sequence's own torch.Generator, row by row, so a seeded request
draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits: [len(seqs), vocab] fp32, row i for seqs[i]. Returns (token ids, raw logprobs)."""
        assert logits.shape[0] == len(seqs), f"{logits.shape[0]} logit rows for {len(seqs)} sequences"
        raw = logits = logits.float()
        logits = self._mask_until_min_tokens(logits, seqs)
        tokens = torch.argmax(logits, dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            tokens = tokens.cpu()
            rows = logits[sampled_rows].cpu()
            for j, i in enumerate(sampled_rows):
                tokens[i] = sample_row(rows[j], seqs[i])
            tokens = tokens.to(logits.device)
        token_logprobs = torch.log_softmax(raw, dim=-1).gather(1, tokens.view(-1, 1)).view(-1)
        return tokens.tolist(), token_logprobs.tolist()

    def _mask_until_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """EOS (unless ignored) and stop ids get -inf while a sequence is below min_new_tokens."""
        masked = None
        vocab = logits.shape[-1]
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens >= p.min_new_tokens:
                continue
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                if masked is None:
                    masked = logits.clone()
                masked[i, banned] = float("-inf")
        return logits if masked is None else masked


def sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    """Sample one token from one row of logits with the sequence's generator."""
    p = seq.params
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())
