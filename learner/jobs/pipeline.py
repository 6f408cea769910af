"""Steps 1-3 in one process on the embedded task: SFT, reward model, PPO, with tuned defaults.

    python -m learner.jobs.pipeline RUN_DIR [--seed S]      (or `run_pipeline(run_dir, seed=S)`)

The three steps are the library's own (`run_sft`, `run_reward`, `run_ppo`); this module only chooses
their configuration for the tiny embedded model and reports what a user wants to see: the gold score
of greedy responses after SFT and after PPO, the reward model's held-out accuracy, the KL to the
reference, and the wall time of each step. The gold score is measured on fresh prompts of the task's
questions (`eval_prompts`), greedy and sampled (temperature 1, 4 per prompt: the policy PPO optimises,
as a user of a sampling server sees it), and greedy on the held-out questions no training sample asks
(`gold_held_out_*`: how far the tiny model's pre-trained knowledge carries the gain over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError
from learner.config import PPOConfig, RewardConfig, SFTConfig
from learner.ppo.step import run_ppo
from learner.reward import run_reward
from learner.sft import run_sft
from learner.task.evaluate import gold_of_checkpoint
from learner.task.pretrain import default_model_path

log = logging.getLogger(__name__)

# one data spec for all three steps, so data_split cuts the same pool the same way in each
SAMPLES = 6000                  # embedded pool: 1200 demonstrations, 2400 pairs, 2400 PPO prompts
COMMON: dict[str, Any] = {"data": [f"embedded:{SAMPLES}"], "data_split": "2,4,4", "max_seq_len": 64, "log_every": 20,
                          "eval_fraction": 0.1}
# tuned for the embedded model (64 wide, 2 layers) on 2 CPU cores; ZeRO-0: one process shards nothing
DEEPSPEED: dict[str, Any] = {"zero_stage": 0}
SFT_DEFAULTS: dict[str, Any] = {"epochs": 2, "batch_size": 16, "learning_rate": 5e-4}
REWARD_DEFAULTS: dict[str, Any] = {"epochs": 6, "batch_size": 16, "learning_rate": 1e-3}
# normalize_reward: the reward model's scores spread over about +-8 here, so clip_reward_value (5) cut most of
# the top off and PPO stopped telling a right polite answer from a wrong polite one; z-scored, the clip rarely bites.
# missing_eos_penalty: every pair the reward model learned from ends with EOS, so a response cut at max_new_tokens is
# out of its distribution; on seed 5 PPO found that filler repeated to the cut scored well (gold 76 -> 49)
PPO_DEFAULTS: dict[str, Any] = {"iterations": 120, "rollout_batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2,
                                "max_prompt_len": 16, "max_new_tokens": 24, "actor_learning_rate": 1e-4,
                                "critic_learning_rate": 5e-4, "kl_coef": 0.1, "normalize_reward": True,
                                "missing_eos_penalty": 2.0}
# the critic-free algorithms: the same 32 responses per iteration, as 8 prompts x 4 samples for the group baselines
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {},
    "grpo": {"rollout_batch_size": 8, "samples_per_prompt": 4, "cliprange_high": 0.28},
    "rloo": {"rollout_batch_size": 8, "samples_per_prompt": 4},
    "reinforce++": {},
}


def ppo_defaults(algo: str = "ppo") -> dict[str, Any]:
    """Step 3's defaults on the embedded task for `algo` (ConfigError naming `algo` when unknown)."""
    if algo not in ALGO_DEFAULTS:
        raise ConfigError("algo", f"must be one of {', '.join(ALGO_DEFAULTS)}, got {algo!r}")
    return {**PPO_DEFAULTS, **ALGO_DEFAULTS[algo], "algo": algo}


def _config(cls, run_dir: Path, step: str, seed: int, model: str, overrides: dict[str, Any] | None):
    """A validated step config: COMMON, then the step's defaults, then the caller's overrides."""
    values = {**COMMON, "seed": seed, "output_dir": str(run_dir / step), "model": model, **(overrides or {})}
    ds_values = {**DEEPSPEED, **values.pop("deepspeed", {})}
    return build_config(cls, values, ds_values)


def build_config(cls, values: dict[str, Any], ds_values: dict[str, Any]):
    """cls(**values) with its DeepSpeed options replaced by `ds_values`, validated; an unknown field is a
    ConfigError naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in names:
            raise ConfigError(name, f"is not a field of {cls.__name__}")
    config = cls(**values)
    config.deepspeed = dataclasses.replace(config.deepspeed, **ds_values)
    return config.validate()


def run_pipeline(run_dir: str | Path, *, seed: int = 1234, model: str = "", sft: dict[str, Any] | None = None,
                 reward: dict[str, Any] | None = None, ppo: dict[str, Any] | None = None,
                 threads: int = 1, samples: int = SAMPLES, algo: str = "ppo") -> dict:
    """SFT, reward model and PPO on the embedded task in this process; returns the headline figures.

    `sft`/`reward`/`ppo` override fields of the step configs (a "deepspeed" key takes a dict of
    DeepSpeedOptions fields); `model` defaults to the embedded model (pre-trained on first use).
    `samples` is the size of the embedded data pool that data_split cuts for the three steps.
    `algo` picks step 3's algorithm (ppo, grpo, rloo, reinforce++) with its defaults (ALGO_DEFAULTS).
    `threads` sets torch's intra-op threads for the run (a 64-wide model gains nothing from more; they contend).
    """
    run_dir = Path(run_dir)
    if samples < 10:
        raise ConfigError("samples", f"must be >= 10 (data_split cuts it in three), got {samples}")
    data = {"data": [f"embedded:{samples}"]}
    sft, reward, ppo = ({**data, **(step or {})} for step in (sft, reward, ppo))
    began = time.perf_counter()
    sft_config = _config(SFTConfig, run_dir, "sft", seed, model, {**SFT_DEFAULTS, **(sft or {})})
    reward_config = _config(RewardConfig, run_dir, "reward", seed, model, {**REWARD_DEFAULTS, **(reward or {})})
    ppo_overrides = {**ppo_defaults(algo), "actor_model": str(run_dir / "sft"), "critic_model": str(run_dir / "reward"),
                     "reward_model": str(run_dir / "reward"), **(ppo or {})}
    ppo_config = _config(PPOConfig, run_dir, "ppo", seed, "", ppo_overrides)
    model = model or str(default_model_path())      # configs are checked first: a typo fails before pre-training
    sft_config.model, reward_config.model = sft_config.model or model, reward_config.model or model
    ppo_config.tokenizer = ppo_config.tokenizer or model
    pretrain_s = time.perf_counter() - began
    times = {"model_s": pretrain_s}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        sft_result = run_sft(sft_config)
        times["sft_s"] = time.perf_counter() - t
        t = time.perf_counter()
        reward_result = run_reward(reward_config)
        times["reward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ppo_result = run_ppo(ppo_config)
        times["ppo_s"] = time.perf_counter() - t
        t = time.perf_counter()
        actor = ppo_result.get("checkpoint", str(run_dir / "ppo" / "actor"))
        sampled = {}
        for when, path in (("before", sft_result["checkpoint"]), ("after", actor)):
            sampled[f"gold_sampled_{when}"] = gold_of_checkpoint(path, max_new_tokens=ppo_config.max_new_tokens, seed=seed)
            sampled[f"gold_held_out_{when}"] = gold_of_checkpoint(path, max_new_tokens=ppo_config.max_new_tokens,
                                                                  seed=seed, temperature=0.0, held_out=True)
        times["eval_s"] = time.perf_counter() - t
        times["total_s"] = time.perf_counter() - began
    finally:
        torch.set_num_threads(previous_threads)

    if "gold_before" not in ppo_result or "gold_after" not in ppo_result:
        raise RuntimeError(f"run_ppo reported no gold scores (data {ppo_config.data}): is it the embedded task?")
    summary = {"seed": seed, "algo": ppo_config.algo, "gold_before": ppo_result["gold_before"],
               "gold_after": ppo_result["gold_after"],
               "gold_gain": ppo_result["gold_after"] - ppo_result["gold_before"], **sampled,
               "gold_sampled_gain": sampled["gold_sampled_after"] - sampled["gold_sampled_before"],
               "reward_accuracy": reward_result.get("eval_accuracy", float("nan")),
               "kl": ppo_result.get("kl", float("nan")), "reward_score": ppo_result.get("reward_score", float("nan")),
               "sft_eval_loss": sft_result.get("eval_loss", float("nan")), **times,
               "checkpoint": actor}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("pipeline (seed %d): gold (greedy) %.1f -> %.1f, gold (sampled) %.1f -> %.1f, gold (held-out questions) "
             "%.1f -> %.1f, RM accuracy %.3f, KL %.3f, %.0f s", seed, summary["gold_before"], summary["gold_after"],
             sampled["gold_sampled_before"], sampled["gold_sampled_after"], sampled["gold_held_out_before"],
             sampled["gold_held_out_after"], summary["reward_accuracy"], summary["kl"], times["total_s"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.jobs.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default="", help="local HF folder (default: the embedded model)")
    parser.add_argument("--iterations", type=int, default=PPO_DEFAULTS["iterations"], help="PPO iterations")
    parser.add_argument("--algo", default="ppo", choices=tuple(ALGO_DEFAULTS), help="step 3's algorithm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = run_pipeline(args.run_dir, seed=args.seed, model=args.model, ppo={"iterations": args.iterations},
                               algo=args.algo)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
