"""Bounded staleness and truncated importance ratios against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learner.rollout.staleness import split_by_staleness, stale_rows, staleness, truncated_importance_ratios


def test_staleness_is_learner_version_minus_sample_version():
    assert staleness([5, 4, 2, 6], learner_version=5) == [0, 1, 3, -1]


def test_split_keeps_within_the_bound_and_counts_each_reason():
    split = split_by_staleness([5, 4, 3, 2, 6, 5], learner_version=5, max_staleness=2)
    # lags: 0, 1, 2, 3, -1, 0
    assert split.keep == [0, 1, 2, 5]
    assert split.drop == [3, 4]
    assert (split.fresh, split.stale, split.too_stale, split.ahead, split.max_seen) == (2, 2, 1, 1, 3)
    assert split.metrics() == {"rollout_fresh": 2.0, "rollout_stale": 2.0, "rollout_dropped": 2.0,
                               "rollout_old_process": 0.0, "rollout_max_staleness": 3.0}


def test_samples_of_a_restarted_server_are_dropped_whatever_their_version():
    # samples 0 and 3 came from a process that has restarted since: dropped, and counted as neither fresh nor stale
    split = split_by_staleness([5, 4, 5, 4, 5], learner_version=5, max_staleness=1, exclude=[0, 3])
    assert split.keep == [1, 2, 4] and split.drop == [0, 3]
    assert (split.fresh, split.stale, split.old_process) == (2, 1, 2)
    assert split.metrics()["rollout_dropped"] == 2.0 and split.metrics()["rollout_old_process"] == 2.0


def test_max_staleness_zero_is_strictly_on_policy():
    split = split_by_staleness([3, 2, 3], learner_version=3, max_staleness=0)
    assert split.keep == [0, 2] and split.drop == [1] and split.too_stale == 1


def test_split_of_an_empty_batch_and_a_bad_bound():
    split = split_by_staleness([], learner_version=0, max_staleness=1)
    assert split.keep == [] and split.max_seen == 0
    with pytest.raises(ValueError, match="max_staleness"):
        split_by_staleness([0], learner_version=0, max_staleness=-1)


def test_truncated_ratios_by_hand():
    # row 0 is stale, row 1 fresh. Row 0 tokens: log-ratio 0.5 -> e^0.5 = 1.6487; log-ratio 1.0 -> e = 2.718
    # truncated to 2.0; log-ratio -1.0 -> 0.3679; last position is off the mask (padding) -> 1.
    learner = torch.tensor([[-1.0, -0.5, -2.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    behaviour = torch.tensor([[-1.5, -1.5, -1.0, 0.0], [-3.0, -3.0, -3.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    weights, stats = truncated_importance_ratios(learner, behaviour, mask, stale=stale_rows(torch.tensor([3, 4]), 4),
                                                 cap=2.0)
    expected = torch.tensor([[math.exp(0.5), 2.0, math.exp(-1.0), 1.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(weights, expected)
    assert stats.tokens == 3
    assert stats.mean_ratio == pytest.approx((math.exp(0.5) + math.exp(1.0) + math.exp(-1.0)) / 3, rel=1e-6)
    assert stats.truncated_fraction == pytest.approx(1 / 3)
    assert stats.max_ratio == pytest.approx(math.exp(1.0), rel=1e-6)


def test_without_a_stale_mask_every_row_is_weighted():
    learner = torch.tensor([[-1.0, -2.0]])
    behaviour = torch.tensor([[-1.0, -2.0 - math.log(1.5)]])
    weights, stats = truncated_importance_ratios(learner, behaviour, torch.ones(1, 2), cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.5]]))
    assert stats.tokens == 2 and stats.truncated_fraction == 0.0
    assert stats.metrics()["is_ratio_mean"] == pytest.approx(1.25)


def test_no_stale_tokens_gives_unit_weights_and_neutral_stats():
    learner, behaviour = torch.zeros(2, 3), torch.full((2, 3), -5.0)
    weights, stats = truncated_importance_ratios(learner, behaviour, torch.ones(2, 3),
                                                 stale=torch.tensor([False, False]))
    assert torch.equal(weights, torch.ones(2, 3))
    assert (stats.tokens, stats.mean_ratio, stats.truncated_fraction) == (0, 1.0, 0.0)


def test_weights_carry_no_gradient_and_a_bad_cap_is_refused():
    learner = torch.tensor([[-1.0]], requires_grad=True)
    weights, _ = truncated_importance_ratios(learner, torch.tensor([[-1.2]]), torch.ones(1, 1))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_ratios(learner, learner, torch.ones(1, 1), cap=0.0)
