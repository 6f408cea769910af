"""Turn a batch of logits into next tokens: greedy (vectorised), temperature, top-k, top-p.

The logprobs of a row (the sampled token's, and `top_logprobs` when asked) follow its request's
`logprobs_mode`, as vLLM's option of that name:

- "raw" (default): the RAW model distribution, log_softmax of the fp32 logits (temperature 1, no
  top-k/top-p, no min_new_tokens mask). It costs one log_softmax over the batch.
- "processed": the distribution the token was actually drawn from, the log_softmax of the very row
  `process_logits` hands to the draw: the logits after the min_new_tokens mask, divided by the
  temperature, then top-k and top-p masked (-inf), so it is renormalised over the kept tokens. A greedy
  row takes the argmax of the masked logits, so its processed distribution is those logits at
  temperature 1 with top-k/top-p ignored (as vLLM, which turns both off for greedy requests): the same
  as raw unless min_new_tokens is masking EOS and stop ids.

The learner uses these as behaviour logprobs: "processed" is the one whose ratio is over the
distribution actually sampled (learner.ppo.processing computes the same on the learner's side).
Sampled rows use their sequence's own torch.Generator, row by row, so a seeded request draws the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.engine.top_logprobs import top_logprobs
from serving.layers import greedy_kernel


class Sampled(NamedTuple):
    token_ids: list[int]
    logprobs: list[float]                                # of each sampled token, in its row's logprobs_mode
    top_logprobs: list[list[tuple[int, float]]] | None   # see serving.engine.top_logprobs; None: no row asked


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
        """logits: [len(seqs), vocab] fp32, row i for seqs[i]."""
        assert logits.shape[0] == len(seqs), f"{logits.shape[0]} logit rows for {len(seqs)} sequences"
        raw = logits = logits.float()
        logits = self._mask_until_min_tokens(logits, seqs)
        processed: dict[int, torch.Tensor] = {}     # row -> log_softmax of what it was drawn from ("processed" rows)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if logits is raw and not sampled_rows:      # all greedy, nothing masked: argmax and logprob in one pass
            picked = greedy_kernel.greedy_pick(raw)
            if picked is not None:
                return Sampled(picked[0].tolist(), picked[1].tolist(), top_logprobs(raw, seqs, processed))
        tokens = torch.argmax(logits, dim=-1)
        if sampled_rows:
            tokens = tokens.cpu()
            rows = process_rows(logits[sampled_rows].cpu(), [seqs[i].params for i in sampled_rows])
            tokens[sampled_rows] = draw(rows, [seqs[i].generator for i in sampled_rows])
            for j, i in enumerate(sampled_rows):
                if seqs[i].params.logprobs_mode == "processed":
                    processed[i] = torch.log_softmax(rows[j], dim=-1)
            tokens = tokens.to(logits.device)
        if logits is not raw:                       # greedy "processed" rows under the min_new_tokens mask
            for i, s in enumerate(seqs):
                if s.params.greedy and s.params.logprobs_mode == "processed" and \
                        s.num_output_tokens < s.params.min_new_tokens:
                    processed[i] = torch.log_softmax(logits[i], dim=-1)
        token_ids = tokens.tolist()
        token_logprobs = torch.log_softmax(raw, dim=-1).gather(1, tokens.view(-1, 1)).view(-1).tolist()
        for i, row in processed.items():
            token_logprobs[i] = row[token_ids[i]].item()
        return Sampled(token_ids, token_logprobs, top_logprobs(raw, seqs, processed))

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


def process_logits(logits: torch.Tensor, p: SamplingParams, divided: bool = False) -> torch.Tensor:
    """One row of logits -> the logits a sampled (non-greedy) row draws from: / temperature (unless already
    `divided`), then top-k, then top-p; dropped tokens are -inf. The only implementation of top-k/top-p in
    serving."""
    if not divided:
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
    return logits


def process_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """process_logits for every row: the temperature division batched, top-k/top-p row by row where asked."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temperature
    for i, p in enumerate(params):
        if 0 < p.top_k < logits.shape[-1] or p.top_p < 1.0:
            logits[i] = process_logits(logits[i], p, divided=True)
    return logits


def draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits[i]), by inverse transform: row i's one uniform u_i from its own
    generator picks the first token whose cumulative probability exceeds u_i. One softmax and one cumsum
    over the batch instead of torch.multinomial row by row (which draws an exponential per vocabulary entry:
    half of a 16-row TinyStories decode step); each row still depends on its own generator alone. A token
    of probability 0 (masked) is never drawn: its cumulative mass equals its predecessor's."""
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1, dtype=torch.float64)   # 2^-53 steps, not 2^-24
    u = torch.stack([torch.rand((), dtype=cdf.dtype, generator=g) for g in generators])
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    over = chosen >= logits.shape[-1]            # u * total rounded up to the total: the last token with mass
    if bool(over.any()):
        vocab = logits.shape[-1]
        last = vocab - 1 - torch.argmax(torch.flip(logits > float("-inf"), [1]).to(torch.uint8), dim=1)
        chosen = torch.where(over, last, chosen)
    return chosen
