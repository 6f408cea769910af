"""`tandem up`, reduced (few steps, few PPO iterations): real server and learner processes over 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.up import parse_overrides
from common.errors import ConfigError
from learner.jobs.up import UpConfig

ITERATIONS = 2
REDUCED = ["--data", "embedded:600", "--set", "sft.max_steps=20", "--set", "reward.max_steps=20",
           "--set", "ppo.rollout_batch_size=16", "--set", "ppo.mini_batch_size=8"]


def up_command(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "cli.up", "--run-dir", str(run_dir), *REDUCED, *extra]


@pytest.mark.slow
def test_reduced_tandem_up_serves_every_pushed_version_and_writes_the_summary(tmp_path):
    summary_file = tmp_path / "summary.json"
    done = subprocess.run(up_command(tmp_path / "run", "--iterations", str(ITERATIONS), "--summary", str(summary_file)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tandem up: done" in done.stdout and "gold score" in done.stdout
    s = json.loads(summary_file.read_text())
    for key in ("gold_before", "gold_after", "gold_after_served", "gold_sampled_before", "gold_sampled_after",
                "gold_sampled_served", "reward_accuracy", "kl"):
        assert isinstance(s[key], float), (key, s[key])
    assert 0 <= s["gold_before"] <= 100 and 0 <= s["gold_after"] <= 100 and 0 <= s["reward_accuracy"] <= 1
    assert s["ppo_iterations"] == ITERATIONS
    versions = s["weight_versions_pushed"]               # the SFT weights, then one per PPO iteration
    assert versions == list(range(versions[0], versions[0] + ITERATIONS + 1)) and versions[0] >= 1
    assert s["served_version"] == versions[-1] and "ppo iteration" in s["served_origin"]
    # the ending: SFT and served greedy answers to the fixed held-out prompts, side by side with gold scores
    from learner.task import gold_score, showcase_prompts

    shown = s["side_by_side"]
    assert [r["prompt"] for r in shown] == showcase_prompts()
    for r in shown:
        assert r["weight_version"] == versions[-1] and r["served"]
        assert r["served_gold"] == gold_score(r["prompt"], " " + r["served"]) and 0 <= r["sft_gold"] <= 100
    assert "SFT model -> served model" in done.stdout and shown[0]["served"] in done.stdout
    # the learner's fp32 actor and the served copy of it answer the eval prompts alike
    assert abs(s["gold_after_served"] - s["gold_after"]) < 5.0, s
    assert s["bytes_pushed"] > 0 and s["tensors_per_push"] > 0 and s["swap_ms_max"] >= 0
    rollout = s["rollout"]
    assert rollout["rollout_fresh"] + rollout["rollout_stale"] == 16 * ITERATIONS
    assert rollout["rollout_stale"] > 0 and rollout["rollout_prefetched"] == ITERATIONS - 1   # overlap happened
    for stage in ("model_s", "server_start_s", "sft_s", "reward_s", "ppo_s", "total_s"):
        assert s["stage_wall_s"][stage] >= 0, stage
    assert [row["iteration"] for row in s["reward_curve"]] == list(range(1, ITERATIONS + 1))
    assert s["story_plot"].endswith("story.png") and (tmp_path / "run" / "story.png").stat().st_size > 0
    assert any(p.endswith(".png") for p in s["plots"]) and s["story_plot"] not in s["plots"]   # the grid, too
    server_log = (tmp_path / "run" / "server.log").read_text()
    for version in versions:                          # each version was swapped in on the server
        assert re.search(rf"weights v{version} in force", server_log), version


@pytest.mark.slow
def test_ctrl_c_stops_the_learner_and_the_server(tmp_path):
    proc = subprocess.Popen(up_command(tmp_path / "run", "--iterations", "50"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        address = None
        deadline = time.monotonic() + 300
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.match(r"tandem up: serving .* on (\S+)", line)
            address = match.group(1) if match else None
        assert address, "tandem up never reported its server"
        time.sleep(3.0)                                # the learner is starting
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    with grpc.insecure_channel(address) as channel:  # the server is gone with it
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("field, config", [
    ("ranks", UpConfig(ranks=0)), ("max_staleness", UpConfig(max_staleness=-1)),
    ("push_quantize", UpConfig(push_quantize="int3")), ("model", UpConfig(model="/no/such/folder")),
    ("overrides", UpConfig(overrides={"rlhf": {}})), ("zero_stage", UpConfig(zero_stage=5)),
    ("algo", UpConfig(algo="dpo")),
])
def test_bad_up_options_name_the_field(field, config):
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.field == field


def test_set_overrides_parse_json_values_and_refuse_bad_syntax():
    assert parse_overrides(["ppo.kl_coef=0.02", "sft.data_split=2,4,4", "ppo.adaptive_kl=true"]) == {
        "ppo": {"kl_coef": 0.02, "adaptive_kl": True}, "sft": {"data_split": "2,4,4"}}
    with pytest.raises(ConfigError) as info:
        parse_overrides(["kl_coef=0.1"])
    assert info.value.field == "set"


def test_tandem_up_refuses_a_bad_option_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.up", "--run-dir", str(tmp_path), "--ranks", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2 and "--ranks" in done.stderr
    assert not (tmp_path / "server.log").exists()
