"""One PPO iteration's learner work (experience forwards + actor/critic update) per lever, in one process.

    python -m benchmarks.ppo_step [--repeats 5] [--zero-stage 0] [--threads 1]

The DeepSpeed-Chat step-3 shape (benchmarks.rlhf): 16 rollouts of HH-RLHF prompts cut to 128
TinyStories tokens plus 128 response tokens, one minibatch of 16, TinyStories-656K as actor, reference,
critic and reward. The same rollouts go through trainers that differ in one lever at a time, interleaved
(every repeat runs every variant once), so a busy machine slows them alike: `before` has all of issue 11's
levers off, each `+lever` turns one on, `after` is today's defaults. Rollouts count as fresh (made by the
weights being trained, as local rollouts are), so `+reuse` skips the actor's experience forward; `+logprobs in
update` skips it for any rollout, fresh or stale (a server's, one push behind), taking them from the update's.
Prints the median experience and update seconds per variant and the ratio to `before`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys

from benchmarks.rlhf import BEFORE, HH_RLHF, TINYSTORIES

VARIANTS = {"before": {}, "+reuse": {"reuse_rollout_logprobs": True}, "+bf16 frozen": {"frozen_dtype": "bfloat16"},
            "+sorted chunks": {"sort_chunk_rows": 4}, "+values in update": {"values_in_update": True},
            "+logprobs in update": {"logprobs_in_update": True}, "after": None}


def hh_prompts(tokenizer, n: int, max_len: int) -> list[list[int]]:
    out = []
    with gzip.open(HH_RLHF / "helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            prompt = text[: text.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
            out.append(tokenizer(prompt).input_ids[-max_len:])
            if len(out) == n:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ppo_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not TINYSTORIES.is_dir() or not HH_RLHF.is_dir():
        sys.exit(f"benchmarks.ppo_step needs {TINYSTORIES} and {HH_RLHF}")
    import logging
    import time

    import torch

    from learner.config import DeepSpeedOptions, PPOConfig
    from learner.ppo.models import load_models
    from learner.ppo.trainer import PPOTrainer
    from learner.rollout.local import Rollout

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model = str(TINYSTORIES)
    base = dict(actor_model=model, critic_model=model, reward_model=model, tokenizer=model,
                output_dir="runs/bench-ppo-step/ppo", rollout_batch_size=16, mini_batch_size=16, max_prompt_len=128,
                max_new_tokens=128, deepspeed=DeepSpeedOptions(zero_stage=args.zero_stage))
    trainers = {}
    for name, lever in VARIANTS.items():
        config = PPOConfig(**base, **({**BEFORE, **lever} if lever is not None else {})).validate()
        models = load_models(config)
        trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward,
                             models.tokenizer.pad_token_id)
        trainer.fresh_version = 0
        trainers[name] = trainer
    tokenizer = models.tokenizer
    rng = random.Random(0)
    rollouts = [Rollout(prompt_ids=p, response_ids=[rng.randrange(3, tokenizer.vocab_size) for _ in range(128)],
                        logprobs=[-5.0] * 128, finish_reason="length", weight_version=0)
                for p in hh_prompts(tokenizer, 16, 128)]
    times: dict[str, dict[str, list[float]]] = {name: {"experience": [], "update": []} for name in trainers}
    for repeat in range(args.repeats + 1):                     # the first round warms up
        for name, trainer in trainers.items():
            began = time.perf_counter()
            exp = trainer.make_experience(rollouts)
            made = time.perf_counter()
            trainer.train_on(exp)
            if repeat:
                times[name]["experience"].append(made - began)
                times[name]["update"].append(time.perf_counter() - made)
    padding = 1 - sum(len(r.prompt_ids) for r in rollouts) / (16 * max(len(r.prompt_ids) for r in rollouts))
    print(f"PPO learner step, DS-Chat shape (16 x 128+128, prompt padding {padding:.0%}), ZeRO-{args.zero_stage}, "
          f"{args.threads} thread(s), median of {args.repeats} [min-max] s:")
    ref = {k: statistics.median(v) for k, v in times["before"].items()}
    for name, t in times.items():
        e, u = statistics.median(t["experience"]), statistics.median(t["update"])
        print(f"  {name:17s} experience {e:6.3f} [{min(t['experience']):.3f}-{max(t['experience']):.3f}] "
              f"({ref['experience'] / e:4.2f}x)   update {u:6.3f} [{min(t['update']):.3f}-{max(t['update']):.3f}] "
              f"({ref['update'] / u:4.2f}x)   both {(ref['experience'] + ref['update']) / (e + u):4.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
