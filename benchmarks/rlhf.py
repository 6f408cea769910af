"""Step-3 (PPO) throughput in DeepSpeed-Chat's own setting: rollouts in the learner vs from the server.

    python -m benchmarks.rlhf                                   # DS-Chat setting, ZeRO-0 and 3, local and remote
    python -m benchmarks.rlhf --zero-stages 3 --modes remote --variants before,after --repeats 3
    python -m benchmarks.rlhf --ranks 2 --zero-stages 3         # two learner ranks (deepspeed launcher)
    python -m benchmarks.rlhf --setting embedded                # the embedded task's step 3 (tandem up's sizes)

The DeepSpeed-Chat setting (../shared/ENVIRONMENT.md): TinyStories-656K as actor and reference, the same
base plus a fresh value head as critic and reward; HH-RLHF prompts cut to 128 tokens; 16 prompts per
iteration, one minibatch of 16; up to 128 new tokens, ending at EOS as DS-Chat's `generate` does
(`--fixed-length`: always 128, with ignore_eos); ppo_epochs 1; fp32. DeepSpeed-Chat (hybrid engine off)
measured 15-19 samples/s at ZeRO-0, 6.8-7.7 at ZeRO-3 and 22.4 with 2 processes on this machine type; TRL
1.12 PPO 10-11.

Modes: `local` generates with HF `generate` inside the learner (DS-Chat without its hybrid engine; the
learner gets every core); `remote` rolls out on the generation server (a child process, 1 thread) while
the learner (the other core) trains on the previous batch, and pushes the actor (fp32) after every
iteration; the server generates the next batch while the learner makes its experience and starts its
update, so in `after` each update phase takes every core (`update_threads`) once the server is done.
Variants: `after` is today's defaults; `before` turns off this issue's levers (the actor's experience forward
on fresh rollouts, bf16 frozen models, length-sorted chunks, the actor's logprobs and the critic's values from
their update forwards, update_threads) to show what they buy.

Every run is its own child process (`--ranks` of them under the deepspeed launcher), the runs of one
repeat interleaved. Throughput counts the iterations after the first (warm-up), from the end of iteration
1 to the end of the last, push included: samples/s over all ranks. The time split is the per-iteration
median of generate (waiting for rollouts), experience (the frozen and critic forwards), train (actor
and critic updates) and push.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSTORIES = SHARED / "models" / "tinystories-656k"
HH_RLHF = SHARED / "hh-rlhf"
DSCHAT = {"max_prompt_len": 128, "max_new_tokens": 128, "rollout_batch_size": 16,
          "mini_batch_size": 16, "ppo_epochs": 1, "actor_learning_rate": 9.65e-6, "critic_learning_rate": 5e-6,
          "data_split": "0,0,1"}
# the levers of issue 11, all off: what step 3 did before it
BEFORE = {"reuse_rollout_logprobs": False, "frozen_dtype": "float32", "sort_chunk_rows": 0, "values_in_update": False,
          "logprobs_in_update": False}
REFERENCE = {"deepspeed-chat": {0: "15-19", 3: "6.8-7.7", "2 ranks": "22.4"}, "trl 1.12": "10-11"}


# ---------------------------------------------------------------------------------------------- one run
class Clock:
    """after_iteration hook: time stamps at the end of every iteration (after the push, if any)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, iteration, models, stats):
        self.stamps.append(time.perf_counter())


def one_run(spec: dict) -> dict:
    """run_ppo on this rank with spec's config; rank 0's figures (called in the child)."""
    import torch

    from learner import ds
    from learner.config import PPOConfig
    from learner.jobs.pipeline import build_config
    from learner.metrics import read_metrics
    from learner.ppo.step import run_ppo

    torch.set_num_threads(spec["threads"])
    values = dict(spec["config"])
    config = build_config(PPOConfig, values, values.pop("deepspeed"))
    clock = Clock()
    result = run_ppo(config, after_iteration=clock)
    rows = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if r.get("response_length") is not None]
    timed = rows[1:]
    seconds = clock.stamps[-1] - clock.stamps[0]
    world = ds.world_size()
    pushes = [p["push_s"] for p in result.get("pushes", [])[1:]]

    def median(key):
        return statistics.median(r.get(key, 0.0) for r in timed)

    return {"samples_per_s": config.rollout_batch_size * world * len(timed) / seconds,
            "response_length": statistics.mean(r["response_length"] for r in timed),
            "tokens_per_s": sum(r["response_length"] for r in timed) * config.rollout_batch_size * world / seconds,
            "seconds": seconds, "iterations": len(timed), "generate_s": median("generate_s"),
            "experience_s": median("experience_s"), "update_s": median("update_s"),
            "push_s": statistics.median(pushes) if pushes else 0.0, "rank": ds.rank()}


def child_main(spec_file: str) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_file).read_text())
    figures = one_run(spec)
    if figures["rank"] == 0:
        Path(spec["result"]).write_text(json.dumps(figures))
    return 0


# ---------------------------------------------------------------------------------------------- the parent
def base_config(args, work: Path) -> dict:
    if args.setting == "dschat":
        if not TINYSTORIES.is_dir() or not HH_RLHF.is_dir():
            sys.exit(f"benchmarks.rlhf: the DeepSpeed-Chat setting needs {TINYSTORIES} and {HH_RLHF}")
        model = str(TINYSTORIES)
        data = [f"hh-rlhf:{HH_RLHF / part}" for part in ("helpful-base", "harmless-base")]
        return {"actor_model": model, "critic_model": model, "reward_model": model, "tokenizer": model,
                "data": data, **DSCHAT, **({"ignore_eos": True} if args.fixed_length else {})}
    run = Path(args.run).resolve() if args.run else work / "base"
    prepare(run, args.seed)
    from learner.jobs.pipeline import PPO_DEFAULTS

    return {**PPO_DEFAULTS, "actor_model": str(run / "sft"), "critic_model": str(run / "reward"),
            "reward_model": str(run / "reward"), "tokenizer": str(run / "sft"), "data": ["embedded"]}


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


def launch(spec: dict, ranks: int, work: Path, name: str) -> dict:
    """One run in child process(es); its figures."""
    from learner.launcher import rank_command

    out = Path(spec["config"]["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    spec_file, result = work / f"{name}.json", work / f"{name}.result.json"
    result.unlink(missing_ok=True)
    spec["result"] = str(result)
    spec_file.write_text(json.dumps(spec))
    command = rank_command("benchmarks.rlhf", ["--child", str(spec_file)], ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    with open(work / f"{name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not result.is_file():
        raise RuntimeError(f"benchmark run {name} failed (exit {code}); see {work / (name + '.log')}")
    return json.loads(result.read_text())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if argv is None and "--child" in sys.argv:        # a run's child (the launcher adds --local_rank=N)
        return child_main(sys.argv[sys.argv.index("--child") + 1])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="dschat", choices=("dschat", "embedded"))
    parser.add_argument("--from", dest="run", default="", help="embedded setting: a run folder with sft/ and reward/")
    parser.add_argument("--work", default="runs/bench-rlhf", help="scratch folder")
    parser.add_argument("--iterations", type=int, default=26, help="PPO iterations per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--zero-stages", default="0,3")
    parser.add_argument("--modes", default="local,remote")
    parser.add_argument("--variants", default="after", help="before (this issue's levers off), after, or both")
    parser.add_argument("--ranks", type=int, default=1, help="learner ranks (deepspeed launcher when > 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per learner rank (default: all cores for local, one fewer for remote)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--fixed-length", action="store_true", help="every response 128 tokens (ignore_eos)")
    args = parser.parse_args(argv)
    from common.files import write_private
    from common.process import child_env
    from serving.launch import start_server

    signal.signal(signal.SIGTERM, _interrupt)      # so the server child is stopped on the way out
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = base_config(args, work)
    cores = os.cpu_count() or 2
    stages = [int(s) for s in args.zero_stages.split(",")]
    modes, variants = args.modes.split(","), args.variants.split(",")
    token_file = work / "push_token"
    write_private(token_file, secrets.token_hex(16))
    server = None
    if "remote" in modes:
        context = ["--max-model-len", "512"] if args.setting == "dschat" else []   # the embedded model has 128
        server = start_server(["--model", base["actor_model"], "--port", "0", "--push-token-file", str(token_file),
                               *context], env=child_env(OMP_NUM_THREADS="1"),
                              log_file=work / "server.log")
    results: dict[tuple, list[dict]] = {}
    try:
        for r in range(args.repeats):
            for stage in stages:
                for mode in modes:
                    for variant in variants:
                        key = (stage, mode, variant)
                        name = f"z{stage}-{mode}-{variant}-{r}"
                        threads = args.threads or max(1, (cores - (1 if mode == "remote" else 0)) // args.ranks)
                        config = {**base, "seed": args.seed, "iterations": args.iterations,
                                  "output_dir": str(work / name), "deepspeed": {"zero_stage": stage},
                                  **(BEFORE if variant == "before" else {})}
                        if mode == "remote":
                            config.update(rollout="remote", server=server.address, max_staleness=1,
                                          push_weights=True, push_token_file=str(token_file))
                            if variant == "after":     # the server is idle during the update: take its core
                                config.update(update_threads=max(threads, cores // args.ranks))
                        figures = launch({"config": config, "threads": threads}, args.ranks, work, name)
                        results.setdefault(key, []).append(figures)
                        print(f"{name:24s} {json.dumps({k: round(v, 3) for k, v in figures.items()})}", flush=True)
    finally:
        if server is not None:
            server.stop()
    report(results, args)
    return 0


def report(results: dict[tuple, list[dict]], args) -> None:
    print(f"\nstep-3 throughput, {args.setting} setting, {args.ranks} rank(s), {args.iterations - 1} timed "
          f"iterations x {args.repeats} runs (median [min-max]); split = per-iteration medians in s:")
    print(f"{'ZeRO':>4} {'mode':7} {'variant':7} {'samples/s':>22} {'generate':>9} {'experience':>10} {'train':>7} "
          f"{'push':>6}   DeepSpeed-Chat")
    for (stage, mode, variant), runs in results.items():
        rate = [x["samples_per_s"] for x in runs]
        split = [statistics.median(x[k] for x in runs) for k in ("generate_s", "experience_s", "update_s", "push_s")]
        ref = REFERENCE["deepspeed-chat"]["2 ranks" if args.ranks > 1 else stage] if args.setting == "dschat" else ""
        print(f"{stage:>4} {mode:7} {variant:7} {statistics.median(rate):8.1f} [{min(rate):5.1f}-{max(rate):5.1f}]"
              f"{split[0]:>10.3f} {split[1]:>10.3f} {split[2]:>7.3f} {split[3]:>6.3f}   {ref}")
    for stage in sorted({k[0] for k in results}):
        for variant in sorted({k[2] for k in results}):
            a, b = results.get((stage, "local", variant)), results.get((stage, "remote", variant))
            if a and b:
                ratio = statistics.median(x["samples_per_s"] for x in b) / statistics.median(x["samples_per_s"] for x in a)
                print(f"ZeRO-{stage} {variant}: two-service / local = {ratio:.2f}x")
        before, after = results.get((stage, "remote", "before")), results.get((stage, "remote", "after"))
        if before and after:
            ratio = (statistics.median(x["samples_per_s"] for x in after)
                     / statistics.median(x["samples_per_s"] for x in before))
            print(f"ZeRO-{stage} remote: after / before = {ratio:.2f}x")
    if args.setting == "dschat":
        print(f"TRL 1.12 PPO, same setting: {REFERENCE['trl 1.12']} samples/s")


if __name__ == "__main__":
    sys.exit(main())
