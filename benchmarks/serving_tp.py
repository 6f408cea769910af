"""Tensor-parallel serving throughput: the same engine and mixed workload at --tp 1 and --tp 2 (CPU ranks).

    python -m benchmarks.serving_tp [--models tinystories,llama25m] [--tp 1,2] [--requests 64] [--repeats 3]

Each tp degree gets one LLMEngine (tp > 1: serving.parallel.serve.build_tp_engine, gloo ranks spawned by this
process); the degrees run interleaved, --repeats times, on the FastGen-style mixed workload of
benchmarks.serving (all requests submitted at once, EOS ignored, only requested tokens counted). Threads:
tp=1 uses all --threads in one process; tp=N gives each rank --threads // N (on a 2-core machine: one
thread per rank), so both use the same cores; tp=1 is also run on one thread (the per-rank compute of tp=2
on two cores). Prints tokens/s min and median, and the ratio to the first degree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.serving import run_engine
from benchmarks.workload import SHARED_DATA, mixed_workload, num_params, random_llama


def make_engine(path: Path, tp: int, token_budget: int):
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.parallel.serve import build_tp_engine

    cfg = EngineConfig(model=str(path), dtype="float32", device="cpu", token_budget=token_budget,
                       enable_prefix_caching=False)   # repeats resend the same prompts
    return LLMEngine(cfg) if tp == 1 else build_tp_engine(cfg, tp)


def bench_model(name: str, path: Path, args) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    requests = mixed_workload(args.requests, cfg.vocab_size, cfg.max_position_embeddings, seed=args.seed,
                              avoid={t for t in eos if t is not None})
    print(f"\n== {name}: {num_params(path) / 1e6:.2f}M params, {len(requests)} requests, "
          f"{sum(len(r.prompt_ids) for r in requests)} prompt + {sum(r.max_new_tokens for r in requests)} "
          f"output tokens, token budget {args.token_budget}")
    degrees = [int(x) for x in args.tp.split(",")]
    engines = {tp: make_engine(path, tp, args.token_budget) for tp in degrees}
    # (label, tp, threads per rank); tp=1 is also run on one thread: the per-rank compute of tp=2 on 2 cores
    runs = [(f"tp={tp}", tp, max(1, args.threads // tp)) for tp in degrees]
    if 1 in degrees and args.threads > 1:
        runs.append(("tp=1 1-thread", 1, 1))
    results: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    try:
        for _, tp, threads in runs:                      # warm up
            torch.set_num_threads(threads)
            run_engine(engines[tp], requests[:4])
        for rep in range(args.repeats):
            line = []
            for label, _tp, threads in runs:
                torch.set_num_threads(threads)
                secs, useful = run_engine(engines[tp], requests)
                results[label].append(useful / secs)
                line.append(f"{label} {results[label][-1]:8.1f} tok/s")
            print(f"  repeat {rep}: " + "   ".join(line))
    finally:
        for engine in engines.values():
            shutdown = getattr(engine.runner, "shutdown", None)
            if shutdown is not None:
                shutdown()
    base_label = runs[0][0]
    base = statistics.median(results[base_label])
    for label, _tp, threads in runs:
        xs = results[label]
        print(f"  {label:<14} ({threads} thread(s) per rank): min {min(xs):8.1f}  median {statistics.median(xs):8.1f} "
              f"tok/s  ({statistics.median(xs) / base:.2f}x of {base_label})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tinystories,llama25m")
    parser.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel degrees")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over the ranks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tinystories":
                path = SHARED_DATA / "models" / "tinystories-656k"
                if not path.exists():
                    print(f"skipping tinystories: {path} is absent")
                    continue
            elif name == "llama25m":
                path = random_llama(Path(tmp) / "llama25m")
            else:
                print(f"unknown model {name!r} (tinystories, llama25m)")
                return 2
            bench_model(name, path, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
