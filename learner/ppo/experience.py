"""The experience batch: rollouts laid out as tensors, with everything PPO fixes when the batch is made.

Sequences are [left padding | prompt | response | right padding]: every prompt ends at column P - 1 and
every response starts at column P. Per-token tensors are over the shifted sequence ([B, L - 1], position
i scores token i + 1), and `action_mask` is 1 exactly on the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from learner.rollout.local import Rollout


@dataclass
class SequenceBatch:
    """Token ids of rollouts, padded: input_ids/attention_mask [B, L], action_mask [B, L - 1]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor    # [B, L - 1], 0 off the response
    weight_versions: torch.Tensor       # [B]
    prompt_width: int

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], pad_id: int) -> SequenceBatch:
        if not rollouts:
            raise ValueError("no rollouts")
        prompt_width = max(len(r.prompt_ids) for r in rollouts)
        response_width = max(max(len(r.response_ids) for r in rollouts), 1)
        width = prompt_width + response_width
        batch = len(rollouts)
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        action_mask = torch.zeros((batch, width - 1), dtype=torch.float32)
        behaviour = torch.zeros((batch, width - 1), dtype=torch.float32)
        for row, r in enumerate(rollouts):
            start, n = prompt_width - len(r.prompt_ids), len(r.response_ids)
            input_ids[row, start:prompt_width] = torch.tensor(r.prompt_ids, dtype=torch.long)
            input_ids[row, prompt_width:prompt_width + n] = torch.tensor(r.response_ids, dtype=torch.long)
            attention_mask[row, start:prompt_width + n] = 1
            action_mask[row, prompt_width - 1:prompt_width - 1 + n] = 1.0
            if r.logprobs:
                behaviour[row, prompt_width - 1:prompt_width - 1 + n] = torch.tensor(r.logprobs[:n])
        versions = torch.tensor([r.weight_version for r in rollouts], dtype=torch.long)
        return cls(input_ids, attention_mask, action_mask, behaviour, versions, prompt_width)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.action_mask.sum(1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding), as `generate` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ExperienceBatch:
    """One PPO batch. logprobs, values and advantages are fixed here, before any PPO epoch runs."""

    input_ids: torch.Tensor             # [B, L]
    attention_mask: torch.Tensor        # [B, L]
    action_mask: torch.Tensor           # [B, L - 1]
    logprobs: torch.Tensor              # the actor's raw logprobs when the batch was made ("old"; the KL's)
    ratio_logprobs: torch.Tensor        # the same under the policy ratios' distribution (= logprobs unless
                                        # config.logprobs_mode is "processed": learner.ppo.processing)
    ref_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor    # from the rollout source, of the ratios' distribution (config.logprobs_mode):
                                        # equal to the old ones for a fresh local rollout
    values: torch.Tensor                # the critic's values when the batch was made ("old")
    rewards: torch.Tensor               # KL-penalised per-token rewards
    advantages: torch.Tensor
    returns: torch.Tensor
    score: torch.Tensor                 # [B] reward-model score (after normalisation, before clipping)
    raw_score: torch.Tensor             # [B] reward-model score as the model gave it
    weight_versions: torch.Tensor       # [B]
    prompt_width: int = 1               # responses start at this column (P); 1 = unknown, score every position
    values_pending: bool = False        # values, rewards, advantages and returns are still to come from the
                                        # critic's update forward (PPOTrainer.values_in_update)
    logprobs_pending: bool = False      # logprobs and ratio_logprobs (and so rewards, advantages and returns)
                                        # still to come from the actor's update forward (PPOTrainer.logprobs_in_update)

    @property
    def pending(self) -> bool:
        """Whether an update forward still has to fill in part of the batch (it is then its own one minibatch)."""
        return self.values_pending or self.logprobs_pending

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _tensors(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def select(self, index: torch.Tensor) -> ExperienceBatch:
        return replace(self, **{name: getattr(self, name)[index] for name in self._tensors()})

    def minibatches(self, size: int, generator: torch.Generator):
        """Yield minibatches of `size` rows in a fresh random order (call once per PPO epoch)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start:start + size])

    def to(self, device: torch.device) -> ExperienceBatch:
        return replace(self, **{name: getattr(self, name).to(device) for name in self._tensors()})
