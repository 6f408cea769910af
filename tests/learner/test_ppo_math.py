"""The PPO arithmetic against values computed by hand (see the comments), masking of prompt and padding included.

Layout (learner/ppo/math.py): [B, T] over the shifted sequence; mask is 1 on response tokens only.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.ppo import math as pm

# row 0: two prompt positions, then three response tokens
# row 1: left padding + one prompt position, two response tokens, one right-padding position
MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)


def test_kl_penalized_rewards_pay_the_clipped_score_on_the_last_response_token():
    logprobs = torch.tensor([[-3.0, -4.0, -1.0, -2.0, -0.5], [-9.0, -9.0, -2.0, -1.0, 9.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.5, -1.0, -0.5], [0.0, 0.0, -1.0, -1.0, 3.0]])
    score = torch.tensor([7.0, -2.0])
    rewards = pm.kl_penalized_rewards(logprobs, ref, score, MASK, kl_coef=0.1, clip_reward_value=5.0)
    # row 0: -0.1*(0.5), -0.1*(-1.0), 0 + clip(7, 5) ; row 1: -0.1*(-1.0), 0 + (-2); prompt and padding 0
    expected = torch.tensor([[0.0, 0.0, -0.05, 0.1, 5.0], [0.0, 0.0, 0.1, -2.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_by_hand_with_prompt_and_padding_masked():
    values = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 0.5, 1.0, 7.0]])  # 9s: prompt, 7: padding
    rewards = torch.tensor([[0.0, 0.0, -0.05, 0.1, 5.0], [0.0, 0.0, 0.1, -2.0, 0.0]])
    adv, ret = pm.gae(values, rewards, MASK, gamma=0.9, lam=0.8)
    # row 0: d4 = 5 - 3 = 2; d3 = 0.1 + 0.9*3 - 2 = 0.8, A3 = 0.8 + 0.72*2 = 2.24;
    #        d2 = -0.05 + 0.9*2 - 1 = 0.75, A2 = 0.75 + 0.72*2.24 = 2.3628
    # row 1: the padding value 7 must not leak: d3 = -2 + 0 - 1 = -3; d2 = 0.1 + 0.9*1 - 0.5 = 0.5,
    #        A2 = 0.5 + 0.72*(-3) = -1.66
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 2.3628, 2.24, 2.0], [0.0, 0.0, -1.66, -3.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.0, 3.3628, 4.24, 5.0], [0.0, 0.0, -1.16, -2.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    values = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.0, 0.0, -0.05, 0.1, 5.0]])
    adv, ret = pm.gae(values, rewards, MASK[:1], gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.0, 5.05, 5.1, 5.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 4.05, 3.1, 2.0]]))


def test_clipped_policy_loss_and_its_gradient():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    old = torch.tensor([[0.0, -1.0, -1.0, -1.0, -1.0]])
    # ratios: prompt exp(5) (masked), then 1.5, 0.5, 1.0, 0.5
    new = (old + torch.tensor([[5.0, math.log(1.5), math.log(0.5), 0.0, math.log(0.5)]])).requires_grad_()
    adv = torch.tensor([[100.0, 1.0, 1.0, -2.0, -1.0]])
    loss, stats = pm.policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5;
    # max(2, 2) = 2; max(0.5, 0.8) = 0.8 (clipped)  ->  (-1.2 - 0.5 + 2 + 0.8) / 4 = 0.275
    assert loss.item() == pytest.approx(0.275, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens and the prompt get no gradient; others -A r / 4
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0, -0.125, 0.5, 0.0]]))


def test_policy_loss_weights_scale_each_token():
    mask = torch.tensor([[1.0, 1.0]])
    logp = torch.tensor([[-1.0, -1.0]])
    loss, _ = pm.policy_loss(logp, logp, torch.tensor([[1.0, 3.0]]), mask, 0.2, weights=torch.tensor([[0.5, 1.0]]))
    assert loss.item() == pytest.approx((-0.5 - 3.0) / 2)


def test_clipped_value_loss_by_hand():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[10.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.5, 1.1, 0.5]])
    returns = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    loss, stats = pm.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t1: clip -> 0.7: max(1.0, 1.69) = 1.69; t2: within range: 1.0; t3: clip -> 0.3: max(0, 0.09) = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.09) / 3, abs=1e-6)
    assert stats["value_clip_fraction"].item() == pytest.approx(2 / 3)


def test_whiten_and_masked_mean_ignore_masked_entries():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    assert pm.masked_mean(x, mask).item() == pytest.approx(2.5)
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1..4
    expected = torch.tensor([[0.0, -1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0]])
    torch.testing.assert_close(pm.whiten(x, mask), expected)
    torch.testing.assert_close(pm.masked_mean(x, mask, dim=1), torch.tensor([2.5]))


def test_sequence_kl_and_logprobs_from_logits():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.5, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(pm.sequence_kl(logp, ref, mask), torch.tensor([1.0, 2.0]))
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])
    torch.testing.assert_close(pm.logprobs_from_logits(logits, torch.tensor([[1, 1]])),
                               torch.tensor([[math.log(0.75), math.log(0.2)]]))


def test_adaptive_kl_controller_moves_towards_target():
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=16)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 16 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 16 / 10000) * (1 - 0.1 * 100 / 10000))
    fixed = pm.FixedKLController(0.1)
    fixed.update(100.0, 16)
    assert fixed.value == 0.1


def test_running_mean_std_matches_the_whole_batch():
    rms = pm.RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 3.0]))
    rms.update(torch.tensor([4.0, 5.0]))
    assert rms.mean == pytest.approx(3.0) and rms.var == pytest.approx(2.0) and rms.count == 5
    torch.testing.assert_close(rms.normalize(torch.tensor([3.0, 5.0])),
                               torch.tensor([0.0, 2.0 / math.sqrt(2.0 + 1e-8)]))
