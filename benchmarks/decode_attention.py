"""Decode attention over the paged KV cache: the in-place C++ kernel against the bucketed SDPA path.

    python -m benchmarks.decode_attention [--batch 64] [--threads 1]

64 decoding sequences with mixed context lengths (16..600, as in the mixed workload), the 32M Llama's
attention shape (8 query heads, 4 KV heads, head_dim 64) and TinyStories' (head_dim 16); both paths
run interleaved in one process, several repeats; prints min/median microseconds per layer call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from serving.batch import ScheduledChunk
from serving.layers import attention, paged_kernel


def bench(batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, repeats: int, calls: int):
    rng = random.Random(0)
    block_size = 16
    lens = [rng.randint(16, 600) for _ in range(batch)]
    need = [(n + block_size) // block_size for n in lens]
    ids = list(range(sum(need)))
    rng.shuffle(ids)
    chunks, at = [], 0
    for i, (n, b) in enumerate(zip(lens, need)):
        chunks.append(ScheduledChunk(i, [1], n, ids[at:at + b], True))
        at += b
    cache = torch.randn(2, len(ids), block_size, kv_heads, head_dim, dtype=dtype)
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, head_dim, dtype=dtype)
    metas = {}
    for name, use in (("bucketed SDPA", False), ("in-place kernel", True)):
        real = paged_kernel.available
        paged_kernel.available = (lambda device, dt, hd=None, real=real: real(device, dt)) if use else (lambda *a: False)
        try:
            metas[name] = attention.AttentionMetadata.build(chunks, block_size, torch.device("cpu"), dtype)
        finally:
            paged_kernel.available = real
    times = {name: [] for name in metas}
    for _ in range(repeats):
        for name, meta in metas.items():
            attention.paged_attention(q, k, k, cache, meta)
            start = time.perf_counter()
            for _ in range(calls):
                attention.paged_attention(q, k, k, cache, meta)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    ref = attention.paged_attention(q, k, k, cache, metas["bucketed SDPA"]).float()
    got = attention.paged_attention(q, k, k, cache, metas["in-place kernel"]).float()
    print(f"  {str(dtype)[6:]:8} H={heads} Hkv={kv_heads} D={head_dim} batch {batch}: "
          + "  ".join(f"{n} min {min(t):7.0f} med {statistics.median(t):7.0f} us" for n, t in times.items())
          + f"  speedup(med) {statistics.median(times['bucketed SDPA']) / statistics.median(times['in-place kernel']):.2f}x"
          + f"  max|diff| {(ref - got).abs().max().item():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not paged_kernel.available(torch.device("cpu"), torch.float32):
        print("the paged decode kernel is unavailable here (see the log); nothing to compare")
        return
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, head_dim in ((8, 4, 64), (8, 4, 16)):
            bench(args.batch, heads, kv_heads, head_dim, dtype, args.repeats, args.calls)


if __name__ == "__main__":
    main()
