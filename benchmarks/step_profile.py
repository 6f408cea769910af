"""Where `LLMEngine.step()` spends its time, phase by phase, on the mixed workload.

    python -m benchmarks.step_profile [--models tinystories,llama25m] [--dtype float32] [--threads 1]

Runs the 64-request mixed workload of benchmarks/workload.py through a real engine once to warm up,
then once timed, with wall-clock timers wrapped around the engine's own phases (nothing is replaced:
each wrapper calls the real method): schedule, metadata (AttentionMetadata.build and the input
tensors), forward (the model's layers), logits (LM head), sample, and output (finish checks,
detokenizing, RequestOutput building: the rest of step()). Prints each phase's share of step time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.workload import SHARED_DATA, mixed_workload, random_llama


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, phase: str) -> None:
        real = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(obj, attr, timed)


def profile(path: Path, dtype: str, token_budget: int, requests: int, seed: int, tokenizer: Path | None) -> dict:
    import serving.engine.model_runner as model_runner_module
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams

    cfg = EngineConfig(model=str(path), tokenizer=str(tokenizer) if tokenizer else None, dtype=dtype,
                       device="cpu", token_budget=token_budget,
                       enable_prefix_caching=False)   # the timed run resends the warm-up's prompts
    engine = LLMEngine(cfg)
    info = engine.info
    work = mixed_workload(requests, info.vocab_size, info.max_model_len, seed=seed, avoid=set(info.eos_token_ids))

    def run() -> tuple[float, int]:
        for i, r in enumerate(work):
            engine.add_request(f"p{time.monotonic_ns()}-{i}", r.prompt_ids,
                               SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens, ignore_eos=True))
        tokens, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        return time.perf_counter() - start, tokens

    run()  # warm-up
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "run", "runner")
    timer.wrap(engine.runner.model, "forward", "forward")
    timer.wrap(engine.runner.model, "compute_logits", "logits")
    sampler_real = engine.sampler

    class TimedSampler:
        def __call__(self, logits, seqs):
            start = time.perf_counter()
            try:
                return sampler_real(logits, seqs)
            finally:
                timer.seconds["sample"] += time.perf_counter() - start

    engine.sampler = TimedSampler()
    metadata_class = model_runner_module.AttentionMetadata
    model_runner_module.AttentionMetadata = type("TimedMetadata", (), {
        "build": staticmethod(lambda *a, **k: _timed(timer, "attn_metadata", metadata_class.build, *a, **k))})
    step = engine.step
    engine.step = lambda: _timed(timer, "step", step)
    try:
        wall, tokens = run()
    finally:
        model_runner_module.AttentionMetadata = metadata_class
    s = timer.seconds
    phases = {
        "schedule": s["schedule"],
        "metadata": s["runner"] - s["forward"] - s["logits"],   # input tensors + AttentionMetadata.build
        "forward": s["forward"],
        "logits": s["logits"],
        "sample": s["sample"],
        "output": s["step"] - s["schedule"] - s["runner"] - s["sample"],
    }
    return {"wall": wall, "tokens": tokens, "step": s["step"], "phases": phases,
            "attn_metadata": s["attn_metadata"]}


def _timed(timer: PhaseTimer, phase: str, fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timer.seconds[phase] += time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tinystories,llama25m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            tokenizer = None
            if name == "tinystories":
                path = tokenizer = SHARED_DATA / "models" / "tinystories-656k"
                if not path.exists():
                    print(f"skipping tinystories: {path} is absent")
                    continue
            else:
                path = random_llama(Path(tmp) / "llama25m")
            r = profile(path, args.dtype, args.token_budget, args.requests, args.seed, tokenizer)
            print(f"== {name} {args.dtype} {args.threads} thread(s): {r['tokens']} tokens in {r['wall']:.2f} s "
                  f"= {r['tokens'] / r['wall']:.1f} tok/s; step() {r['step']:.2f} s")
            for phase, secs in r["phases"].items():
                print(f"  {phase:<9} {secs:7.3f} s  {100 * secs / r['step']:5.1f}%")
            print(f"  (of metadata: AttentionMetadata.build {r['attn_metadata']:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
