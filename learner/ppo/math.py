"""The PPO arithmetic as pure functions (DeepSpeed-Chat's step 3, plus whitening, reward normalisation
and an adaptive KL controller).

Layout: every per-token tensor is [B, T] over the *shifted* sequence (position i scores token i + 1, as
logprobs from logits[:, :-1] do), and `mask` is 1 exactly on the response tokens the policy produced:
0 on the prompt, on left padding before it and on right padding after the response. The response of a
row is contiguous; its last mask-1 position is where the sequence-level score is paid.
"""

from __future__ import annotations

import math

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask-1 entries (all of them, or along `dim`); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the mask-1 entries; masked entries come out 0."""
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last mask-1 position of each row: [B] (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask > 0).long()).argmax(dim=1)


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, score: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, clip_reward_value: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (logp - ref_logp) on every response token, plus the score clipped to
    [-clip_reward_value, clip_reward_value] on the last response token. Zero off the response. [B, T]"""
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    clipped = score.to(rewards.dtype).clamp(-clip_reward_value, clip_reward_value)
    has_response = mask.sum(1) > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += torch.where(has_response, clipped, torch.zeros_like(clipped))
    return rewards


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns), [B, T].

    The step after the last response token is terminal (its value is 0); prompt and padding positions
    neither contribute nor receive anything.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = values.shape[1]
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float, weights: torch.Tensor | None = None,
                cliprange_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: mean over response tokens of max(-A r, -A clip(r, 1-e, 1+e_high)),
    r = exp(logp - old_logp); e_high is `cliprange_high` (DAPO's clip-higher) or e. `weights` (e.g. truncated
    importance ratios for stale samples) scale each token's term. Returns (loss, stats: clip_fraction, approx_kl)."""
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = cliprange if not cliprange_high else cliprange_high
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).to(mask.dtype), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss: 0.5 * mean over response tokens of max((v - R)^2, (clip(v, v_old +- e) - R)^2)."""
    mask = mask.to(values.dtype)
    clipped_values = torch.maximum(torch.minimum(values, old_values + cliprange_value), old_values - cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((loss2 > loss1).to(mask.dtype), mask)}
    return loss, stats


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate to the reference: sum over response tokens of logp - ref_logp. [B]"""
    return masked_sum(logprobs - ref_logprobs, mask.to(logprobs.dtype), dim=1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under softmax(logits), computed in float32: [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the per-sequence KL tracks `target`."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMeanStd:
    """Running mean and std of the reward score (parallel Welford over batches) to normalise it."""

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0, eps

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var + self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
