"""The critic-free advantage estimators (GRPO, RLOO, REINFORCE++) and clip-higher, on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learner.ppo import advantages as adv
from learner.ppo import math as pm

# two prompts x three samples; responses of lengths 2, 3, 1 | 2, 2, 3 over T = 4 shifted positions
MASK = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0],
                     [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
SCORES = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])


def test_grpo_normalises_within_each_group_and_gives_a_uniform_group_zero():
    a = adv.group_normalized(SCORES, 3)
    # group 1: mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7)
    s = math.sqrt(7.0)
    assert torch.allclose(a[:3], torch.tensor([-2 / s, -1 / s, 3 / s]), atol=1e-5)
    assert torch.equal(a[3:], torch.zeros(3))              # all equal: no signal, not a division by zero
    unscaled = adv.group_normalized(SCORES, 3, scale=False)   # Dr. GRPO
    assert torch.allclose(unscaled[:3], torch.tensor([-2.0, -1.0, 3.0]))


def test_rloo_baseline_leaves_the_sample_itself_out():
    a = adv.leave_one_out(SCORES, 3)
    # 1 - (2 + 6)/2 = -3; 2 - (1 + 6)/2 = -1.5; 6 - (1 + 2)/2 = 4.5
    assert torch.allclose(a[:3], torch.tensor([-3.0, -1.5, 4.5]))
    assert torch.equal(a[3:], torch.zeros(3))
    # rloo = group/(group-1) times the mean-centred score
    assert torch.allclose(a, adv.group_normalized(SCORES, 3, scale=False) * 1.5)
    with pytest.raises(ValueError):
        adv.leave_one_out(SCORES, 1)
    with pytest.raises(ValueError):
        adv.group_normalized(SCORES, 4)                   # 6 rows are not groups of 4


def test_per_token_broadcast_stays_on_the_response():
    a = adv.per_token(torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0, 3.0]), MASK)
    assert a[0].tolist() == [0.0, 2.0, 2.0, 0.0] and a[2].tolist() == [0.0, 0.5, 0.0, 0.0]
    assert a[5].tolist() == [0.0, 3.0, 3.0, 3.0]


def test_returns_to_go_sum_the_future_rewards_with_discount():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert adv.returns_to_go(rewards, mask, 1.0).tolist() == [[0.0, 6.0, 5.0, 3.0]]
    assert torch.allclose(adv.returns_to_go(rewards, mask, 0.5), torch.tensor([[0.0, 1 + 1 + 0.75, 2 + 1.5, 3.0]]))


def test_reinforce_pp_is_the_whitened_return_of_the_kl_penalised_rewards():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -0.5, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, -1.0, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    score = torch.tensor([2.0, -1.0])
    a = adv.reinforce_pp(logp, ref, score, mask, kl_coef=0.5, clip_reward_value=5.0)
    # token rewards -0.5 * (logp - ref): row 0: -0.25, +0.5 (+2 score at the last) -> returns 2.25, 2.5
    # row 1: 0, -0.25, 0 (-1 at the last) -> returns -1.25, -1.25, -1.0
    returns = torch.tensor([2.25, 2.5, -1.25, -1.25, -1.0])
    expected = (returns - returns.mean()) / returns.std()
    assert torch.allclose(a[mask.bool()], expected, atol=1e-5)
    assert a[0, 0] == 0 and a[0, 3] == 0


def test_rloo_sequence_reward_subtracts_the_summed_log_ratio():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # sum of logp - ref over the response: 0.5 - 1.0 = -0.5
    assert torch.allclose(adv.kl_penalized_scores(torch.tensor([3.0]), logp, ref, mask, 0.2), torch.tensor([3.1]))


def test_k3_kl_is_zero_at_the_reference_and_matches_its_formula():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert adv.k3_kl(logp, logp.clone(), mask).item() == 0.0
    ref = torch.tensor([[5.0, -1.5, -1.0]])               # the prompt position (mask 0) must not count
    d = torch.tensor([-0.5, 1.0])
    assert math.isclose(adv.k3_kl(logp, ref, mask).item(), (torch.exp(d) - d - 1).mean().item(), rel_tol=1e-6)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 1.25]]))          # ratio 1.25: clipped at 1.2, not at 1.28
    mask = torch.ones(1, 2)
    a = torch.ones(1, 2)
    symmetric, stats = pm.policy_loss(new.requires_grad_(), old, a, mask, 0.2)
    assert math.isclose(symmetric.item(), -1.2, rel_tol=1e-6) and stats["clip_fraction"].item() == 1.0
    higher, stats = pm.policy_loss(new, old, a, mask, 0.2, cliprange_high=0.28)
    assert math.isclose(higher.item(), -1.25, rel_tol=1e-6) and stats["clip_fraction"].item() == 0.0
    # the low side is untouched: ratio 0.75 with a negative advantage stays clipped at 0.8
    low = torch.log(torch.tensor([[0.75, 0.75]]))
    loss, _ = pm.policy_loss(low, old, -a, mask, 0.2, cliprange_high=0.28)
    assert math.isclose(loss.item(), 0.8, rel_tol=1e-6)
