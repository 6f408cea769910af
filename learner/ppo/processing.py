"""Logprobs under the distribution a rollout was sampled from: the learner's side of `logprobs_mode`.

With PPOConfig.logprobs_mode = "processed" the policy ratios (PPO's clipped ratio, and the truncated
importance ratio of stale samples against the server's behaviour logprobs) are taken over the
distribution the tokens were actually drawn from, not the raw model distribution: the logits divided by
the temperature, then top-k, then top-p masked, renormalised over the kept tokens. That is what the
server returns for logprobs_mode "processed" (serving.engine.sampler); it is written again here over
[..., V] so it runs batched on the learner's logits and carries gradients (the kept set is a constant
of each position, the kept logits are not). Greedy settings (temperature below serving's greedy
threshold) score the raw logits, as the server defines processed logprobs for greedy rows.

A token outside the kept set has probability 0. Its logprob is OUTSIDE_LOGPROB (-1e4) rather than -inf:
prompt and padding positions, which are multiplied by a 0 mask, then stay finite (-inf * 0 is NaN), and
a ratio with it is exp(-1e4) = 0, as with -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.engine.sampling_params import GREEDY_BELOW_TEMPERATURE

OUTSIDE_LOGPROB = -1e4


@dataclass(frozen=True)
class LogitProcessing:
    """The sampling settings that shape the distribution: temperature, top_k (0 = off), top_p."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> the processed logits in float32, -inf outside the kept set."""
        z = logits.float()
        if self.greedy:
            return z
        z = z / self.temperature
        with torch.no_grad():
            keep = torch.ones_like(z, dtype=torch.bool)
            if 0 < self.top_k < z.shape[-1]:
                kth = torch.topk(z, self.top_k, dim=-1).values[..., -1:]
                keep = z >= kth
            if self.top_p < 1.0:
                masked = z.masked_fill(~keep, float("-inf"))
                sorted_z, order = torch.sort(masked, dim=-1, descending=True)
                probs = torch.softmax(sorted_z, dim=-1)
                # a token stays while the mass of the tokens before it is below top_p (the top one always stays)
                stays = (torch.cumsum(probs, dim=-1) - probs) < self.top_p
                keep = keep & torch.zeros_like(keep).scatter(-1, order, stays)
        return z.masked_fill(~keep, float("-inf"))

    def logprobs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) under the processed distribution: [..., V] logits, [...] labels -> [...] float32;
        OUTSIDE_LOGPROB for a label outside the kept set."""
        logp = torch.log_softmax(self.logits(logits), dim=-1)
        picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked.clamp(min=OUTSIDE_LOGPROB)


def processing_for(config) -> LogitProcessing | None:
    """The processing the ratios of a PPOConfig (or a rollout SamplingParams) are over: None for "raw"."""
    if config.logprobs_mode != "processed":
        return None
    return LogitProcessing(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
