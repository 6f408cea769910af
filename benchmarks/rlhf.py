"""Step-3 (PPO) throughput: the synchronous local loop vs the two-service loop, same model, data and lengths.

    python -m benchmarks.rlhf                        # trains SFT + reward on the embedded task first
    python -m benchmarks.rlhf --from runs/up --iterations 8 --repeats 2

(a) local: DeepSpeed-Chat without its hybrid engine. Each iteration generates with HF `generate` on the
    actor inside the learner, then trains: generation and training take turns.
(b) remote: the generation server (a child process, 1 torch thread) rolls out over StreamExperience;
    batch k+1 is generated while the learner trains on batch k (max_staleness 1), and the actor is
    pushed to the server after every iteration (fp32, per-parameter) — the push time is included.
Both run run_ppo with the same config, prompts and seeds, interleaved (a, b, a, b, ...). Throughput
counts the iterations after the first (warm-up) from the end of iteration 1 to the end of the last:
experience samples/s and generated tokens/s. Prints each run, then min/median and the ratio b/a.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from common.files import write_private
from learner.metrics import read_metrics


class Clock:
    """after_iteration hook: time stamps at the end of every iteration (after the push, if any)."""

    def __init__(self, inner=None):
        self.inner, self.stamps = inner, []

    def __call__(self, iteration, models, stats):
        if self.inner is not None:
            self.inner(iteration, models, stats)
        self.stamps.append(time.perf_counter())


def throughput(out_dir: Path, clock: Clock, batch: int) -> dict:
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("response_length") is not None]
    timed = rows[1:]
    seconds = clock.stamps[-1] - clock.stamps[0]
    samples = batch * len(timed)
    tokens = sum(batch * r["response_length"] for r in timed)
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "iterations": len(timed), "mean_generate_s": statistics.mean(r["generate_s"] for r in timed),
            "mean_train_s": statistics.mean(r["train_s"] for r in timed)}


def ppo_config(run: Path, out: Path, args, **extra):
    from learner.config import PPOConfig
    from learner.jobs.pipeline import PPO_DEFAULTS
    from learner.jobs.up_worker import step_config

    spec = {"seed": args.seed, "data": [], "deepspeed": {"zero_stage": args.zero_stage}}
    values = {"actor_model": str(run / "sft"), "critic_model": str(run / "reward"), "reward_model": str(run / "reward"),
              "tokenizer": str(run / "sft"), "iterations": args.iterations, **extra}
    config = step_config(PPOConfig, out.parent, out.name, spec, PPO_DEFAULTS, values)
    config.output_dir = str(out)
    return config


def fresh(out: Path) -> Path:
    """An empty output folder (metrics.jsonl is appended to, so a reused folder would mix runs)."""
    shutil.rmtree(out, ignore_errors=True)
    return out


def run_local(run: Path, out: Path, args) -> dict:
    from learner.ppo.step import run_ppo

    config = ppo_config(run, fresh(out), args)
    clock = Clock()
    run_ppo(config, after_iteration=clock)
    return throughput(out, clock, config.rollout_batch_size)


def run_remote(run: Path, out: Path, args, server: str, token_file: Path) -> dict:
    from learner.ppo.step import run_ppo

    config = ppo_config(run, fresh(out), args, rollout="remote", server=server, max_staleness=1, push_weights=True,
                        push_token_file=str(token_file))
    clock = Clock()
    result = run_ppo(config, after_iteration=clock)      # the push runs before the clock's stamp
    timing = throughput(out, clock, config.rollout_batch_size)
    timing["rollout"] = result["rollout"]
    return timing


def prepare(run: Path, seed: int) -> None:
    """SFT and reward checkpoints on the embedded task (pipeline defaults), unless already there."""
    if (run / "sft" / "config.json").is_file() and (run / "reward" / "config.json").is_file():
        return
    from learner.config import RewardConfig, SFTConfig
    from learner.jobs.pipeline import REWARD_DEFAULTS, SFT_DEFAULTS
    from learner.jobs.up_worker import step_config
    from learner.reward import run_reward
    from learner.sft import run_sft
    from learner.task import default_model_path

    model = str(default_model_path())
    spec = {"seed": seed, "data": []}
    run_sft(step_config(SFTConfig, run, "sft", spec, SFT_DEFAULTS, {"model": model}))
    run_reward(step_config(RewardConfig, run, "reward", spec, REWARD_DEFAULTS, {"model": model}))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import logging

    from common.process import child_env
    from serving.launch import start_server

    parser = argparse.ArgumentParser(prog="python -m benchmarks.rlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="run", default="", help="a run folder with sft/ and reward/ (default: train them)")
    parser.add_argument("--work", default="runs/bench-rlhf", help="scratch folder")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the learner (both loops)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)      # so the server child is stopped on the way out
    work = Path(args.work).resolve()
    run = Path(args.run).resolve() if args.run else work / "base"
    prepare(run, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "push_token"
    write_private(token_file, secrets.token_hex(16))
    server = start_server(["--model", str(run / "sft"), "--port", "0", "--push-token-file", str(token_file)],
                          env=child_env(OMP_NUM_THREADS="1"), log_file=work / "server.log")
    try:
        address = server.address
        results: dict[str, list[dict]] = {"local": [], "remote": []}
        for r in range(args.repeats):
            results["local"].append(run_local(run, work / f"local{r}", args))
            print("local ", json.dumps(results["local"][-1]), flush=True)
            results["remote"].append(run_remote(run, work / f"remote{r}", args, address, token_file))
            print("remote", json.dumps(results["remote"][-1]), flush=True)
    finally:
        server.stop()
    print(f"\nstep-3 throughput, embedded task, {args.iterations - 1} timed iterations x {args.repeats} runs each:")
    for key in ("samples_per_s", "tokens_per_s"):
        a = [x[key] for x in results["local"]]
        b = [x[key] for x in results["remote"]]
        print(f"  {key:14s} local min {min(a):8.1f} median {statistics.median(a):8.1f} | two-service min {min(b):8.1f} "
              f"median {statistics.median(b):8.1f} | ratio (median) {statistics.median(b) / statistics.median(a):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
