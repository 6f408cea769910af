"""The learner half of `tandem up`: steps 1-3 on the embedded task with step 3 rolled out through the server.

    python -m learner.jobs.up_worker SPEC.json                               (one rank)
    deepspeed --num_gpus N --module learner.jobs.up_worker SPEC.json         (N ranks)

SPEC.json (written by learner.jobs.up) names the run folder, the server, the push-token file and the
step overrides. SFT and the reward model train as in learner.jobs.pipeline; then run_ppo with rollout=remote
(learner.rollout.server_link) pushes the SFT actor to the server (the version PPO starts from), rolls
out through it (overlapped, bounded staleness) and pushes the actor after every iteration.
Rank 0 writes the figures to <run>/learner.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from learner import ds
from learner.config import PPOConfig, RewardConfig, SFTConfig
from learner.jobs.pipeline import COMMON, DEEPSPEED, REWARD_DEFAULTS, SFT_DEFAULTS, build_config, ppo_defaults

log = logging.getLogger(__name__)


def step_config(cls, run_dir: Path, step: str, spec: dict[str, Any], defaults: dict[str, Any],
                extra: dict[str, Any] | None = None):
    """COMMON, the step's pipeline defaults, `extra`, then the user's overrides for this step; validated."""
    values = {**COMMON, **defaults, "seed": spec["seed"], "output_dir": str(run_dir / step),
              **({"data": spec["data"]} if spec.get("data") else {}), **(extra or {}),
              **spec.get("overrides", {}).get(step, {})}
    ds_values = {**DEEPSPEED, **spec.get("deepspeed", {}), **values.pop("deepspeed", {})}
    return build_config(cls, values, ds_values)




def learn(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from learner.metrics import MetricsLogger
    from learner.ppo.step import run_ppo
    from learner.reward import run_reward
    from learner.sft import run_sft

    torch.set_num_threads(int(spec.get("threads", 1)))
    run_dir, server, model = Path(spec["run_dir"]), spec["server"], spec["model"]
    encoding = spec.get("encoding", "float32")
    sft = step_config(SFTConfig, run_dir, "sft", spec, SFT_DEFAULTS, {"model": model})
    reward = step_config(RewardConfig, run_dir, "reward", spec, REWARD_DEFAULTS, {"model": model})
    ppo = step_config(PPOConfig, run_dir, "ppo", spec, ppo_defaults(spec.get("algo", "ppo")), {
        "actor_model": str(run_dir / "sft"), "critic_model": str(run_dir / "reward"),
        "reward_model": str(run_dir / "reward"), "tokenizer": model, "rollout": "remote", "server": server,
        "max_staleness": spec.get("max_staleness", 1), "push_weights": True, "push_token_file": spec["token_file"],
        "push_quantize": encoding,
        **({"iterations": spec["iterations"]} if spec.get("iterations") else {})})
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
    pushes, first = ppo_result["pushes"], ppo_result["first_version"]
    with MetricsLogger(run_dir / "sync") as sync:      # the weight-sync figures, plotted with the rest
        for p in pushes:
            sync.log(p["iteration"], version=p["version"], push_ms=1e3 * p["push_s"], swap_ms=1e3 * p["swap_s"],
                     stage_ms=1e3 * p["stage_s"], megabytes=p["bytes_sent"] / 2**20)
    return {
        "gold_before": ppo_result.get("gold_before"), "gold_after": ppo_result.get("gold_after"),
        "reward_accuracy": reward_result.get("eval_accuracy"), "sft_eval_loss": sft_result.get("eval_loss"),
        "kl": ppo_result.get("kl"), "reward_score": ppo_result.get("reward_score"), "algo": ppo.algo,
        "samples_per_prompt": ppo_result.get("samples_per_prompt", 1),
        "rl_samples_per_s": ppo_result.get("iterations", 0) * ppo.rollout_batch_size
        * ppo_result.get("samples_per_prompt", 1) / max(times["ppo_s"], 1e-9),
        "ppo_iterations": ppo.iterations, "first_version": first, "final_version": ppo_result["final_version"],
        "versions_pushed": [first] + [p["version"] for p in pushes],
        "bytes_pushed": sum(p["bytes_sent"] for p in pushes), "push_encoding": encoding,
        "push_s": [round(p["push_s"], 4) for p in pushes], "swap_s": [round(p["swap_s"], 5) for p in pushes],
        "stage_s": [round(p["stage_s"], 4) for p in pushes], "tensors_per_push": pushes[0]["tensors"] if pushes else 0,
        "rollout": ppo_result["rollout"], "max_new_tokens": ppo.max_new_tokens, "max_prompt_len": ppo.max_prompt_len,
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
