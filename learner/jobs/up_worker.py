"""The learner half of `tandem up`: steps 1-3 (the embedded task, or real data) with step 3 rolled out through
the server.

    python -m learner.jobs.up_worker SPEC.json                               (one rank)
    deepspeed --num_gpus N --module learner.jobs.up_worker SPEC.json         (N ranks)

SPEC.json (written by learner.jobs.up) names the run folder, the server, the push-token file and the
step overrides. SFT and the reward model train as in learner.jobs.pipeline; then run_ppo with rollout=remote
(learner.rollout.server_link) pushes the SFT actor to the server (the version PPO starts from), rolls
out through it (overlapped, bounded staleness) and pushes the actor after every iteration.
Every rank rolls out its own share of prompts; only rank 0 pushes. Rank 0 writes the figures to
<run>/learner.json, with what every rank reported (its rank, pid, rollouts) and the ZeRO stage of each step.

Real data (any spec but `embedded`) has no gold judge: PPO trains on the reward model's score, and the
steps get REAL_DATA's longer sequences (the embedded defaults cut an hh-rlhf pair to 64 tokens).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from learner import ds
from learner.config import PPOConfig, RewardConfig, SFTConfig
from learner.data import parse_spec
from learner.jobs.pipeline import COMMON, DEEPSPEED, REWARD_DEFAULTS, SFT_DEFAULTS, build_config, ppo_defaults
from learner.ppo.gold import has_gold_judge

log = logging.getLogger(__name__)

# Real data on a real checkpoint (hh-rlhf on TinyStories-656K, say): pairs whose last turns differ need room
# (the fixture README: truncate to 256), prompts are dialogues, and a step takes seconds, not milliseconds.
REAL_DATA: dict[str, dict[str, Any]] = {
    "sft": {"max_seq_len": 256, "epochs": 1},
    "reward": {"max_seq_len": 256, "epochs": 1},
    "ppo": {"max_seq_len": 256, "max_prompt_len": 128, "max_new_tokens": 48, "iterations": 40},
}


def gold_judged(spec: dict[str, Any]) -> bool:
    """Whether the run's data has the gold judge (only the embedded task has)."""
    return has_gold_judge(spec.get("data") or COMMON["data"])


def step_config(cls, run_dir: Path, step: str, spec: dict[str, Any], defaults: dict[str, Any],
                extra: dict[str, Any] | None = None):
    """COMMON, the step's pipeline defaults (REAL_DATA's over them without a gold judge), `extra`, then the
    user's overrides for this step; validated."""
    real = {} if gold_judged(spec) else REAL_DATA.get(step, {})
    values = {**COMMON, **defaults, **real, "seed": spec["seed"], "output_dir": str(run_dir / step),
              **({"data": spec["data"]} if spec.get("data") else {}), **(extra or {}),
              **spec.get("overrides", {}).get(step, {})}
    ds_values = {**DEEPSPEED, **spec.get("deepspeed", {}), **values.pop("deepspeed", {})}
    return build_config(cls, values, ds_values)


def gather_ranks(rollout: dict[str, float]) -> tuple[list[dict], dict[str, float]]:
    """What every rank says about itself (rank, world size, pid, the rollouts it asked the server for: fresh,
    stale and dropped ones, before any regeneration), and the rollout counts summed over ranks (each rank
    rolls out its own share of prompts). Collective."""
    import torch.distributed as dist

    me = {"rank": ds.rank(), "world_size": ds.world_size(), "pid": os.getpid(),
          "rollouts": int(sum(rollout.get(k, 0) for k in ("rollout_fresh", "rollout_stale", "rollout_dropped")))}
    keys = sorted(rollout)
    if not dist.is_initialized() or ds.world_size() == 1:
        return [me], dict(rollout)
    everyone: list = [None] * ds.world_size()
    dist.all_gather_object(everyone, me)
    return everyone, dict(zip(keys, ds.all_sum([float(rollout[k]) for k in keys])))


def step_configs(spec: dict[str, Any]) -> tuple[SFTConfig, RewardConfig, PPOConfig]:
    """The three steps' validated configs (`tandem up` builds them once before it starts anything, so a bad
    --set fails at once, naming the field)."""
    run_dir, model = Path(spec["run_dir"]), spec["model"]
    sft = step_config(SFTConfig, run_dir, "sft", spec, SFT_DEFAULTS, {"model": model})
    reward = step_config(RewardConfig, run_dir, "reward", spec, REWARD_DEFAULTS, {"model": model})
    ppo = step_config(PPOConfig, run_dir, "ppo", spec, ppo_defaults(spec.get("algo", "ppo")), {
        "actor_model": str(run_dir / "sft"), "critic_model": str(run_dir / "reward"),
        "reward_model": str(run_dir / "reward"), "tokenizer": model, "rollout": "remote", "server": spec["server"],
        "max_staleness": spec.get("max_staleness", 1), "push_weights": True, "push_token_file": spec["token_file"],
        "push_quantize": spec.get("encoding", "float32"), "update_threads": spec.get("update_threads", 0),
        **({"iterations": spec["iterations"]} if spec.get("iterations") else {})})
    for data in {d for step in (sft, reward, ppo) for d in step.data}:
        parse_spec(data)                # a dataset path that is not there: ConfigError("data")
    return sft, reward, ppo


def learn(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from learner.metrics import MetricsLogger
    from learner.ppo.step import run_ppo
    from learner.reward import run_reward
    from learner.sft import run_sft

    torch.set_num_threads(int(spec.get("threads", 1)))
    run_dir = Path(spec["run_dir"])
    encoding = spec.get("encoding", "float32")
    sft, reward, ppo = step_configs(spec)
    times: dict[str, float] = {}
    t = time.perf_counter()
    sft_result = run_sft(sft)
    times["sft_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reward_result = run_reward(reward)
    times["reward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ppo_result = run_ppo(ppo)           # pushes the SFT actor first: the version PPO starts from
    times["ppo_s"] = time.perf_counter() - t
    ranks, rollout = gather_ranks(ppo_result["rollout"])
    world = len(ranks)
    gold = gold_judged(spec)
    held = {}
    if not gold and ds.rank() == 0:     # the prompts the report scores with the reward model
        from learner.jobs.up_reward import held_out_prompts

        held = held_out_prompts(ppo)
    pushes, first = ppo_result["pushes"], ppo_result["first_version"]
    with MetricsLogger(run_dir / "sync") as sync:      # the weight-sync figures, plotted with the rest
        for p in pushes:
            sync.log(p["iteration"], version=p["version"], push_ms=1e3 * p["push_s"], swap_ms=1e3 * p["swap_s"],
                     stage_ms=1e3 * p["stage_s"], megabytes=p["bytes_sent"] / 2**20)
    return {
        "gold_before": ppo_result.get("gold_before"), "gold_after": ppo_result.get("gold_after"),
        "gold_judge": gold, "reward_accuracy": reward_result.get("eval_accuracy"),
        "reward_accuracy_before": reward_result.get("eval_accuracy_before"),
        "reward_eval_pairs": int(reward_result.get("eval_pairs", 0)), "sft_eval_loss": sft_result.get("eval_loss"),
        "kl": ppo_result.get("kl"), "reward_score": ppo_result.get("reward_score"), "algo": ppo.algo,
        "samples_per_prompt": ppo_result.get("samples_per_prompt", 1),
        "rl_samples_per_s": ppo_result.get("iterations", 0) * ppo.rollout_batch_size * world   # a batch per rank
        * ppo_result.get("samples_per_prompt", 1) / max(times["ppo_s"], 1e-9),
        "ppo_iterations": ppo.iterations, "first_version": first, "final_version": ppo_result["final_version"],
        "versions_pushed": [first] + [p["version"] for p in pushes],
        "bytes_pushed": sum(p["bytes_sent"] for p in pushes), "push_encoding": encoding,
        "push_s": [round(p["push_s"], 4) for p in pushes], "swap_s": [round(p["swap_s"], 5) for p in pushes],
        "stage_s": [round(p["stage_s"], 4) for p in pushes], "tensors_per_push": pushes[0]["tensors"] if pushes else 0,
        "rollout": rollout, "ranks": world, "rank_reports": ranks,
        "zero_stage": ppo.deepspeed.zero_stage,
        "zero_stages": {"sft": sft.deepspeed.zero_stage, "reward": reward.deepspeed.zero_stage,
                        "ppo": ppo.deepspeed.zero_stage},
        "held_out": held, "max_new_tokens": ppo.max_new_tokens, "max_prompt_len": ppo.max_prompt_len,
        "seed": ppo.seed, "checkpoint": ppo_result.get("checkpoint"), "times": times,
    }


def main(argv: list[str] | None = None) -> int:
    from learner.__main__ import setup_logging

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local")]
    if len(argv) != 1:
        print("usage: python -m learner.jobs.up_worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    setup_logging()
    from learner.rollout.reconnect import ServerDown

    try:
        result = learn(spec)
    except ConfigError as e:
        print(f"tandem up: error: {e}", file=sys.stderr)
        return 2
    except ServerDown as e:
        print(f"tandem up: error: {e}", file=sys.stderr)
        return 1
    if ds.rank() == 0:
        Path(spec["run_dir"], "learner.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
