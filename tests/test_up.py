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


def interruptible(command: list[str], **kwargs) -> subprocess.Popen:
    """Start `command` as a terminal's foreground job would: with SIGINT at its default. A test run
    started in the background by a non-interactive shell (nohup, `&`) inherits SIGINT ignored, and so
    would the child (Python only turns SIGINT into KeyboardInterrupt where it is not ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)    # exec resets a handler to default
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


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
    proc = interruptible(up_command(tmp_path / "run", "--iterations", "50"), stdout=subprocess.PIPE,
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
    ("algo", UpConfig(algo="dpo")), ("update_threads", UpConfig(update_threads=-1)),
])
def test_bad_up_options_name_the_field(field, config):
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.field == field


def test_placement_gives_each_ranks_update_the_cores_the_server_leaves_idle(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    threads, line = UpConfig(ranks=2).validate().placement()
    assert threads == 4 and "placement on 8 cores: server 1 thread(s)" in line and "4 for the update" in line
    assert UpConfig(ranks=16).placement()[0] == 1                    # never below the learner's own threads
    assert UpConfig(update_threads=3).placement()[0] == 3            # an explicit choice stands


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


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions `text` (a run folder: the server, the launcher, the ranks)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_tandem_up_runs_the_learner_as_two_zero3_ranks_beside_the_server(tmp_path):
    run, summary_file = tmp_path / "run", tmp_path / "summary.json"
    done = subprocess.run(up_command(run, "--ranks", "2", "--iterations", str(ITERATIONS), "--summary",
                                     str(summary_file)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tandem up: learner: 2 ZeRO-3 ranks under the deepspeed launcher" in done.stdout
    assert re.search(r"tandem up: placement on \d+ cores: server 1 thread\(s\); learner 1 thread\(s\) per rank",
                     done.stdout)
    assert "\n  learner: 2 ZeRO-3 ranks under the deepspeed launcher\n" in done.stdout   # and both ranks reported
    s = json.loads(summary_file.read_text())
    assert s["ranks"] == 2 and s["zero_stage"] == 3 and s["launcher"] == "deepspeed"
    assert s["zero_stages"] == {"sft": 3, "reward": 3, "ppo": 3}
    # both ranks ran in one process group and each rolled out its own 16 prompts per iteration through the server
    reports = s["rank_reports"]
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert len({r["pid"] for r in reports}) == 2
    assert [r["rollouts"] for r in reports] == [16 * ITERATIONS] * 2
    rollout = s["rollout"]
    assert rollout["rollout_fresh"] + rollout["rollout_stale"] + rollout["rollout_dropped"] == 2 * 16 * ITERATIONS
    # DeepSpeed's own ZeRO-3 layout: each rank saved its partition of the model states
    shards = {p.name for p in (run / "ppo" / "resume" / "actor").glob("*/zero_pp_rank_*_mp_rank_00_model_states.pt")}
    assert shards == {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    # rank 0 alone pushed: one version per iteration after the SFT weights, each swapped in once, none refused
    versions = s["weight_versions_pushed"]
    assert versions == list(range(versions[0], versions[0] + ITERATIONS + 1))
    server_log = (run / "server.log").read_text()
    for version in versions:
        assert len(re.findall(rf"weights v{version} in force", server_log)) == 1, version
    assert "rejected" not in server_log
    assert s["served_version"] == versions[-1] and all(r["weight_version"] == versions[-1] for r in s["side_by_side"])
    assert isinstance(s["gold_after_served"], float) and abs(s["gold_after_served"] - s["gold_after"]) < 5.0
    for r in reports:                                  # the ranks are gone with the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(r["pid"], 0)
    assert _processes_mentioning(str(run)) == []


@pytest.mark.slow
def test_ctrl_c_stops_both_ranks_the_launcher_and_the_server(tmp_path):
    run = tmp_path / "run"
    proc = interruptible(up_command(run, "--ranks", "2", "--iterations", "50"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        ranks = []
        while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            ranks = [p for p in _processes_mentioning(str(run)) if "--local_rank=" in
                     open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
        assert len(ranks) == 2, "the launcher never started two ranks"
        time.sleep(3.0)                                # the ranks are importing and joining the group
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _processes_mentioning(str(run)) == []       # server, launcher and both ranks: none left behind


def test_tandem_up_refuses_a_bad_step_override_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.up", "--run-dir", str(tmp_path / "run"), "--ranks", "2",
                           "--set", "ppo.no_such_field=1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no_such_field" in done.stderr and "PPOConfig" in done.stderr
    assert not (tmp_path / "run").exists()


def test_real_data_has_no_gold_judge_and_longer_sequences(tmp_path, hh_rlhf_path):
    from learner.jobs.pipeline import COMMON, PPO_DEFAULTS
    from learner.jobs.up_worker import REAL_DATA, gold_judged, step_configs

    spec = {"run_dir": str(tmp_path), "server": "127.0.0.1:1", "token_file": str(tmp_path / "t"), "model": "",
            "seed": 1, "data": [f"hh-rlhf:{hh_rlhf_path / 'helpful-base' / 'test.jsonl.gz'}"],
            "overrides": {"ppo": {"max_new_tokens": 8}}, "deepspeed": {"zero_stage": 3, "num_ranks": 2}}
    sft, reward, ppo = step_configs(spec)
    assert not gold_judged(spec) and gold_judged({**spec, "data": []}) and gold_judged({**spec, "data": ["embedded:9"]})
    assert sft.max_seq_len == reward.max_seq_len == REAL_DATA["sft"]["max_seq_len"] > COMMON["max_seq_len"]
    assert ppo.max_prompt_len == REAL_DATA["ppo"]["max_prompt_len"] > PPO_DEFAULTS["max_prompt_len"]
    assert ppo.max_new_tokens == 8                      # the user's --set still wins
    assert sft.deepspeed.zero_stage == reward.deepspeed.zero_stage == ppo.deepspeed.zero_stage == 3
    embedded = step_configs({**spec, "data": []})[2]
    assert embedded.max_prompt_len == PPO_DEFAULTS["max_prompt_len"] and embedded.data == COMMON["data"]


def test_story_plot_without_a_gold_judge_says_so(tmp_path):
    from learner.metrics import MetricsLogger
    from learner.plot import plot_story

    with MetricsLogger(tmp_path, rank=0) as metrics:
        for step in (1, 2, 3):
            metrics.log(step, reward_score=-0.3 + 0.1 * step, kl=0.01 * step)
    png = plot_story(tmp_path / "metrics.jsonl", tmp_path / "story.png", "no gold", reward_eval=(-0.4, -0.1))
    assert png == tmp_path / "story.png" and png.stat().st_size > 0


HH_REDUCED = ["--set", "sft.max_steps=8", "--set", "reward.max_steps=16", "--set", "sft.max_seq_len=128",
              "--set", "reward.max_seq_len=128", "--set", "ppo.max_prompt_len=64", "--set", "ppo.max_new_tokens=24",
              "--set", "ppo.rollout_batch_size=8", "--set", "ppo.mini_batch_size=8"]


@pytest.mark.slow
def test_tandem_up_on_a_real_checkpoint_and_hh_rlhf_scores_with_the_reward_model(tmp_path, tinystories_path,
                                                                                hh_rlhf_path):
    run, summary_file = tmp_path / "run", tmp_path / "summary.json"
    data = f"hh-rlhf:{hh_rlhf_path / 'helpful-base' / 'test.jsonl.gz'}"
    done = subprocess.run([sys.executable, "-m", "cli.up", "--run-dir", str(run), "--model", str(tinystories_path),
                           "--data", data, *HH_REDUCED, "--iterations", str(ITERATIONS), "--summary",
                           str(summary_file)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "tandem up: no gold judge exists for this data" in out            # said at the start and at the end
    assert out.count("no gold judge exists for this data: PPO trains on the learned reward model's score") == 2
    assert "reward model score (greedy, " in out and "held-out pairwise accuracy" in out
    assert "gold score" not in out and "(reward model score, no gold judge)" in out
    s = json.loads(summary_file.read_text())
    assert s["gold_judge"] is False and s["score"] == "reward model" and "no gold judge" in s["note"]
    for key in ("gold_before", "gold_after", "gold_gain", "gold_after_served"):
        assert s[key] is None, key
    assert "gold_sampled_before" not in s
    # the reward model's figures: held-out pairwise accuracy, reward before/after on held-out prompts, KL
    for key in ("reward_before", "reward_after", "reward_after_served", "reward_gain", "kl",
                "reward_accuracy", "reward_accuracy_before"):
        assert isinstance(s[key], float), (key, s[key])
    assert 0 <= s["reward_accuracy"] <= 1 and s["reward_eval_pairs"] > 0 and s["reward_eval_prompts"] > 0
    assert f"{s['reward_accuracy']:.3f} after ({s['reward_eval_pairs']} pairs)" in out
    assert abs(s["reward_after_served"] - s["reward_after"]) < 0.05, s   # the served copy of the fp32 actor
    versions = s["weight_versions_pushed"]
    assert s["served_version"] == versions[-1] and len(versions) == ITERATIONS + 1
    shown = s["side_by_side"]
    assert shown and all(r["sft_gold"] is None and r["served_gold"] is None for r in shown)
    assert all(isinstance(r["sft_reward"], float) and isinstance(r["served_reward"], float) for r in shown)
    assert all("Human:" in r["prompt"] and r["weight_version"] == versions[-1] for r in shown)
    curve = s["reward_curve"]
    assert [row["iteration"] for row in curve] == list(range(1, ITERATIONS + 1))
    assert all("gold_score" not in row for row in curve)
    assert s["story_plot"] and (run / "story.png").stat().st_size > 0
