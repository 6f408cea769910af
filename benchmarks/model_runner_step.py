"""Time one decode step of a batch of sequences: ModelRunner.run vs HF forward with past_key_values.

    python -m benchmarks.model_runner_step --model ../shared/data/models/tinystories-656k [--batch 32] [--context 128]
    python -m benchmarks.model_runner_step --random-llama-25m          # a ~25M-param random Llama

Both run the same weights in the same process, interleaved, several rounds; prints min/median ms per step
and the ratio (HF / ours, > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from serving.batch import ScheduledChunk
from serving.engine.config import EngineConfig
from serving.engine.model_runner import ModelRunner
from serving.models.random_init import LLAMA_25M, save_random_checkpoint


def time_steps(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model folder")
    parser.add_argument("--random-llama-25m", action="store_true", help="use a random-init ~25M-param Llama")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128, help="tokens already cached per sequence")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    path = args.model or str(save_random_checkpoint(tmp.name, "llama", **LLAMA_25M))

    from transformers import AutoModelForCausalLM

    runner = ModelRunner(EngineConfig(model=path, device="cpu", dtype="float32"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch, ctx, bs = args.batch, args.context, args.block_size
    blocks = -(-(ctx + 1) // bs)
    runner.allocate_kv_cache(batch * blocks + 1, bs)
    vocab = runner.info.vocab_size
    tokens = torch.randint(3, vocab, (batch, ctx + 1))
    tables = [[1 + s * blocks + k for k in range(blocks)] for s in range(batch)]
    runner.run([ScheduledChunk(s, tokens[s, :ctx].tolist(), 0, tables[s], True) for s in range(batch)])
    decode = [ScheduledChunk(s, [int(tokens[s, ctx])], ctx, tables[s], True) for s in range(batch)]

    with torch.inference_mode():
        prefill = hf(tokens[:, :ctx], use_cache=True)
        cache = prefill.past_key_values
    last = tokens[:, ctx:ctx + 1]
    position = torch.full((batch, 1), ctx)

    def hf_step() -> None:
        with torch.inference_mode():
            hf(last, past_key_values=cache, position_ids=position, use_cache=True)
            cache.crop(-1)  # keep the context fixed: every timed step sees the same length

    ours_ms, hf_ms = [], []
    for _ in range(args.rounds):
        ours_ms.append(time_steps(lambda: runner.run(decode), args.steps))
        hf_ms.append(time_steps(hf_step, args.steps))
    print(f"model={path} batch={batch} context={ctx} threads={torch.get_num_threads()}")
    print(f"ours: min {min(ours_ms):.2f} ms, median {statistics.median(ours_ms):.2f} ms per step")
    print(f"HF:   min {min(hf_ms):.2f} ms, median {statistics.median(hf_ms):.2f} ms per step")
    print(f"ratio HF/ours (median): {statistics.median(hf_ms) / statistics.median(ours_ms):.2f}x")


if __name__ == "__main__":
    main()
