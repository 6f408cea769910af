"""The learner half of `tandem up`: steps 1-3 on the embedded task with step 3 rolled out through the server.

    python -m learner.up_worker SPEC.json                               (one rank)
    deepspeed --num_gpus N --module learner.up_worker SPEC.json         (N ranks)

SPEC.json (written by learner.up) names the run folder, the server, the push-token file and the
step overrides. SFT and the reward model train as in learner.pipeline; then the SFT checkpoint is
pushed to the server (the version PPO starts from), and run_ppo rolls out through
RemoteRolloutSource (overlapped, bounded staleness) and pushes the actor after every iteration.
Rank 0 writes the figures to <run>/learner.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from learner import ds
from learner.config import PPOConfig, RewardConfig, SFTConfig
from learner.pipeline import COMMON, DEEPSPEED, REWARD_DEFAULTS, SFT_DEFAULTS, build_config, ppo_defaults
from serving.errors import ConfigError

log = logging.getLogger(__name__)


def step_config(cls, run_dir: Path, step: str, spec: dict[str, Any], defaults: dict[str, Any],
                extra: dict[str, Any] | None = None):
    """COMMON, the step's pipeline defaults, `extra`, then the user's overrides for this step; validated."""
    values = {**COMMON, **defaults, "seed": spec["seed"], "output_dir": str(run_dir / step),
              **({"data": spec["data"]} if spec.get("data") else {}), **(extra or {}),
              **spec.get("overrides", {}).get(step, {})}
    ds_values = {**DEEPSPEED, **spec.get("deepspeed", {}), **values.pop("deepspeed", {})}
    return build_config(cls, values, ds_values)


def prompt_feed(config: PPOConfig, tokenizer) -> Callable[[], list[list[int]]]:
    """The prompt batches run_ppo will ask for after the first, in order (the same seeded PromptStream),
    so the rollout source can generate batch k+1 while the learner trains on batch k."""
    from learner.data import PromptDataset
    from learner.ppo.prompts import PromptStream
    from learner.runtime import cache_dir, step_samples

    train, _ = step_samples(config, "ppo")
    stream = PromptStream(PromptDataset(train, tokenizer, config.max_prompt_len, cache_dir(config)),
                          config.rollout_batch_size, config.seed)
    stream.next_batch()                        # the first batch is generated when run_ppo asks for it
    left = [config.iterations - 1]

    def upcoming() -> list[list[int]]:
        if left[0] <= 0:
            return []
        left[0] -= 1
        return stream.next_batch().ids

    return upcoming


def shared_int(value: int) -> int:
    """Rank 0's value on every rank."""
    from learner.runtime import all_sum

    return int(all_sum([float(value) if ds.rank() == 0 else 0.0])[0])


def learn(spec: dict[str, Any]) -> dict[str, Any]:
    from clients.weight_push import current_version, hf_tensors, push_weights
    from learner.metrics import MetricsLogger
    from learner.modeling import load_tokenizer
    from learner.ppo.push_actor import ActorPusher
    from learner.ppo.remote_rollout import RemoteRolloutSource
    from learner.ppo.step import run_ppo
    from learner.reward import run_reward
    from learner.sft import run_sft

    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    run_dir, server, model = Path(spec["run_dir"]), spec["server"], spec["model"]
    token = Path(spec["token_file"]).read_text().strip()
    encoding = spec.get("encoding", "float32")
    sft = step_config(SFTConfig, run_dir, "sft", spec, SFT_DEFAULTS, {"model": model})
    reward = step_config(RewardConfig, run_dir, "reward", spec, REWARD_DEFAULTS, {"model": model})
    ppo = step_config(PPOConfig, run_dir, "ppo", spec, ppo_defaults(spec.get("algo", "ppo")), {
        "actor_model": str(run_dir / "sft"), "critic_model": str(run_dir / "reward"),
        "reward_model": str(run_dir / "reward"), "tokenizer": model, "rollout": "remote", "server": server,
        "max_staleness": spec.get("max_staleness", 1), "push_weights": True,
        "push_quantize": {"int8": "int8", "int4": "int4"}.get(encoding, "none"),
        **({"iterations": spec["iterations"]} if spec.get("iterations") else {})})
    times: dict[str, float] = {}
    t = time.perf_counter()
    sft_result = run_sft(sft)
    times["sft_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reward_result = run_reward(reward)
    times["reward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    first = 0
    if ds.rank() == 0:          # PPO starts from the SFT weights: the server must serve them too
        report = push_weights(server, hf_tensors(run_dir / "sft"), token=token,
                              version=current_version(server) + 1, origin=f"{run_dir / 'sft'} (step 1)",
                              encoding=encoding)
        first = report.version
    first = shared_int(first)
    tokenizer = load_tokenizer(ppo.tokenizer)
    source = RemoteRolloutSource(server, max_staleness=ppo.max_staleness, learner_version=first,
                                 upcoming=prompt_feed(ppo, tokenizer), seed=ppo.seed * 7919 + ds.rank())
    pusher = ActorPusher(server, token, first, encoding=encoding, origin=str(run_dir / "ppo"), source=source)
    with source:
        ppo_result = run_ppo(ppo, rollout_source=source, after_iteration=pusher)
    times["ppo_s"] = time.perf_counter() - t
    pushes = pusher.reports
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
        "ppo_iterations": ppo.iterations, "first_version": first, "final_version": pusher.version,
        "versions_pushed": [first] + [p["version"] for p in pushes],
        "bytes_pushed": sum(p["bytes_sent"] for p in pushes), "push_encoding": encoding,
        "push_s": [round(p["push_s"], 4) for p in pushes], "swap_s": [round(p["swap_s"], 5) for p in pushes],
        "stage_s": [round(p["stage_s"], 4) for p in pushes], "tensors_per_push": pushes[0]["tensors"] if pushes else 0,
        "rollout": dict(source.totals), "max_new_tokens": ppo.max_new_tokens, "max_prompt_len": ppo.max_prompt_len,
        "seed": ppo.seed, "checkpoint": ppo_result.get("checkpoint"), "times": times,
    }


def main(argv: list[str] | None = None) -> int:
    from learner.__main__ import setup_logging

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local")]
    if len(argv) != 1:
        print("usage: python -m learner.up_worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    setup_logging()
    try:
        result = learn(spec)
    except ConfigError as e:
        print(f"tandem up: error: {e}", file=sys.stderr)
        return 2
    if ds.rank() == 0:
        Path(spec["run_dir"], "learner.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
