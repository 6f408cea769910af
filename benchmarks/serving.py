"""Serving throughput and latency: tandem's engine against HF `generate` with static batches.

    python -m benchmarks.serving [--models tinystories,llama25m] [--requests 64] [--repeats 3]
                                 [--hf-batch 16] [--clients 16] [--tp 1,2]

(a) HF `generate`, greedy, static batches of --hf-batch requests in arrival order, left-padded: how
    DeepSpeed-Chat generates without its hybrid engine; a batch runs until its longest output is done.
(b) tandem's LLMEngine on the same requests, all submitted at once (continuous batching, Dynamic
    SplitFuse). Both produce exactly the requested number of tokens per request (EOS ignored), and only
    those useful tokens are counted. The two run interleaved, --repeats times, in one process; min and
    median are printed, with the ratio of medians.
Then (c) the SplitFuse ablation (fused passes against separate prefill and decode passes) and (d) p50/p95
time-to-first-token and inter-token latency of N concurrent streaming gRPC clients on a real server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.workload import SHARED_DATA, Request, mixed_workload, num_params, random_llama


def run_hf(path: Path, requests: list[Request], batch: int) -> tuple[float, int]:
    """Seconds and useful tokens for HF generate over static batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    useful = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            group = requests[i:i + batch]
            width = max(len(r.prompt_ids) for r in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, r in enumerate(group):
                ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                mask[row, width - len(r.prompt_ids):] = 1
            new = max(r.max_new_tokens for r in group)
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=pad)
            useful += sum(r.max_new_tokens for r in group)
    return time.perf_counter() - start, useful


def make_engine(path: Path, token_budget: int, **overrides):
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine

    tok = path if (path / "tokenizer_config.json").exists() else None
    cfg = EngineConfig(model=str(path), tokenizer=str(tok) if tok else None, dtype="float32", device="cpu",
                       token_budget=token_budget, **overrides)
    return LLMEngine(cfg)


def run_engine(engine, requests: list[Request]) -> tuple[float, int]:
    from serving.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", r.prompt_ids,
                           SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens, ignore_eos=True))
    useful = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            useful += len(out.new_token_ids)
    return time.perf_counter() - start, useful


def latency(path: Path, requests: list[Request], clients: int, token_budget: int) -> dict:
    """TTFT and ITL percentiles of `clients` concurrent streaming gRPC clients on a real server."""
    from clients.client import TandemClient
    from serving.engine.config import EngineConfig
    from serving.rpc.server import start_server

    tok = path if (path / "tokenizer_config.json").exists() else None
    cfg = EngineConfig(model=str(path), tokenizer=str(tok) if tok else None, dtype="float32", device="cpu",
                       token_budget=token_budget)
    server = start_server(cfg, host="127.0.0.1", port=0)
    ttft, itl = [], []
    lock = threading.Lock()

    def worker(share: list[Request]) -> None:
        with TandemClient(f"127.0.0.1:{server.port}") as client:
            for r in share:
                t0 = time.perf_counter()
                last = None
                for delta in client.generate_stream(r.prompt_ids, temperature=0.0,
                                                    max_new_tokens=r.max_new_tokens, ignore_eos=True):
                    now = time.perf_counter()
                    if not delta.token_ids:
                        continue
                    with lock:
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append((now - last) / len(delta.token_ids))
                    last = now

    try:
        threads = [threading.Thread(target=worker, args=(requests[i::clients],)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.stop()
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
    return {"ttft_p50_ms": q(ttft, 0.5), "ttft_p95_ms": q(ttft, 0.95), "itl_p50_ms": q(itl, 0.5),
            "itl_p95_ms": q(itl, 0.95), "tokens_per_s": sum(r.max_new_tokens for r in requests) / wall}


def bench_model(name: str, path: Path, args) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    requests = mixed_workload(args.requests, cfg.vocab_size, cfg.max_position_embeddings, seed=args.seed,
                              avoid={t for t in eos if t is not None})
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    out_tokens = sum(r.max_new_tokens for r in requests)
    print(f"\n== {name}: {num_params(path) / 1e6:.2f}M params, {len(requests)} requests, "
          f"{prompt_tokens} prompt + {out_tokens} output tokens, token budget {args.token_budget}")
    engine = make_engine(path, args.token_budget)
    run_engine(engine, requests[:4])  # warm up both paths
    run_hf(path, requests[:2], 2)
    hf, ours = [], []
    for rep in range(args.repeats):
        secs, useful = run_hf(path, requests, args.hf_batch)
        hf.append(useful / secs)
        secs, useful = run_engine(engine, requests)
        ours.append(useful / secs)
        print(f"  repeat {rep}: HF generate {hf[-1]:8.1f} tok/s   tandem {ours[-1]:8.1f} tok/s")
    print(f"  HF generate (batch {args.hf_batch}): min {min(hf):.1f}  median {statistics.median(hf):.1f} tok/s")
    print(f"  tandem engine:            min {min(ours):.1f}  median {statistics.median(ours):.1f} tok/s")
    print(f"  ratio (median): {statistics.median(ours) / statistics.median(hf):.2f}x")
    ablation(path, requests, args)
    if args.clients:
        lat = latency(path, requests, args.clients, args.token_budget)
        print(f"  {args.clients} streaming gRPC clients: {lat['tokens_per_s']:.1f} tok/s, "
              f"TTFT p50 {lat['ttft_p50_ms']:.1f} ms p95 {lat['ttft_p95_ms']:.1f} ms, "
              f"ITL p50 {lat['itl_p50_ms']:.1f} ms p95 {lat['itl_p95_ms']:.1f} ms")


def ablation(path: Path, requests: list[Request], args) -> None:
    """Dynamic SplitFuse against separate prefill/decode passes, same engine otherwise."""
    from serving.engine.config import SCHEDULING_MODES

    results = {}
    for mode in SCHEDULING_MODES:
        engine = make_engine(path, args.token_budget, scheduling=mode)
        run_engine(engine, requests[:4])
        results[mode] = [len_ / secs for secs, len_ in (run_engine(engine, requests) for _ in range(args.repeats))]
    base = statistics.median(results[SCHEDULING_MODES[0]])
    for mode, xs in results.items():
        print(f"  scheduling={mode:<10} median {statistics.median(xs):8.1f} tok/s  "
              f"({statistics.median(xs) / base:.2f}x of {SCHEDULING_MODES[0]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tinystories,llama25m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16, help="0 skips the latency run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core box, 2 threads made both contenders ~10x slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", default="", metavar="1,2",
                        help="also compare these tensor-parallel degrees (benchmarks/serving_tp.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
            if args.tp:
                from benchmarks import serving_tp

                serving_tp.bench_model(name, path, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
