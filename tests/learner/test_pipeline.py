"""The three steps end to end on the embedded task (a reduced configuration that fits CI's budget)."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from learner.pipeline import run_pipeline
from serving.errors import ConfigError


@pytest.mark.slow
def test_pipeline_learns_the_preference_and_ppo_raises_the_gold_score(tmp_path):
    summary = run_pipeline(tmp_path / "run", seed=3, ppo={"iterations": 30})
    assert summary["reward_accuracy"] > 0.6, summary
    # the policy PPO optimises (sampled responses) gains clearly; full runs gain 12-21 points (see the report)
    assert summary["gold_sampled_after"] > summary["gold_sampled_before"] + 8.0, summary
    assert math.isfinite(summary["kl"]) and summary["kl"] >= 0.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["gold_after"] == summary["gold_after"]
    _, info = AutoModelForCausalLM.from_pretrained(summary["checkpoint"], output_loading_info=True)
    assert not info["missing_keys"]


def test_pipeline_refuses_unknown_override_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_pipeline(tmp_path, ppo={"no_such_field": 1})
    assert err.value.field == "no_such_field"
