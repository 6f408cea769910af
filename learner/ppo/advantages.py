"""Critic-free advantage estimators beside PPO's GAE: GRPO, RLOO and REINFORCE++, as pure functions.

Same layout as learner.ppo.math: per-token tensors are [B, T] over the shifted sequence and `mask` is 1
on the response tokens. Group estimators take the batch prompt-major, `group` consecutive rows per
prompt (as the server's StreamExperience returns `samples_per_prompt` samples of each prompt).

- GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_group) / (std_group + eps), the same for every
  token of response i; the KL to the reference is a loss term (the k3 estimator), not part of the reward.
- RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline; r_i is the score
  minus kl_coef times the response's summed log-ratio to the reference (a sequence-level KL penalty).
- REINFORCE++ (Hu 2025): the per-token KL-penalised rewards of PPO, returns-to-go without a critic
  (gamma), whitened over the whole batch (not per group).
"""

from __future__ import annotations

import torch

from learner.ppo import math as pm


def _groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    if group < 1 or scores.shape[0] % group:
        raise ValueError(f"{scores.shape[0]} rows do not split into groups of {group}")
    return scores.view(-1, group)


def group_normalized(scores: torch.Tensor, group: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO's advantage per response [B]: the score minus its group's mean, divided by the group's
    (unbiased) std when `scale` (Dr. GRPO drops the division). A group whose scores are all equal gets 0."""
    g = _groups(scores.float(), group)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale and group > 1:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out(scores: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO's advantage per response [B]: r_i - (sum of the group - r_i) / (group - 1)."""
    if group < 2:
        raise ValueError("leave-one-out needs groups of at least 2")
    g = _groups(scores.float(), group)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group - 1)
    return (g - baseline).reshape(-1)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-response advantage [B] broadcast to every response token [B, T] (0 off the response)."""
    return advantages.to(mask.dtype).unsqueeze(1) * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the response tokens, [B, T] (0 off the response)."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def reinforce_pp(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, score: torch.Tensor, mask: torch.Tensor,
                 kl_coef: float, clip_reward_value: float, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages [B, T]: returns-to-go of the KL-penalised token rewards, whitened over the batch."""
    rewards = pm.kl_penalized_rewards(logprobs, ref_logprobs, score, mask, kl_coef, clip_reward_value)
    return pm.whiten(returns_to_go(rewards, mask, gamma), mask)


def kl_penalized_scores(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The sequence-level reward RLOO uses: score - kl_coef * sum over the response of (logp - ref_logp), [B]."""
    return score.float() - kl_coef * pm.sequence_kl(logprobs, ref_logprobs, mask)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL loss: mean over response tokens of exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = (ref_logprobs - logprobs) * mask.to(logprobs.dtype)
    return pm.masked_mean(torch.exp(delta) - delta - 1.0, mask)
