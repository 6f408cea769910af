"""The OpenAI-compatible HTTP front against the gRPC front: N concurrent streaming clients on one server.

    python -m benchmarks.http_front [--streams 64] [--tokens 64] [--repeats 3] [--model PATH]

One in-process server serves both fronts over the same engine loop (TinyStories-656K by default). Each
round, N clients stream a completion of exactly --tokens tokens (EOS ignored, greedy, distinct prompts)
through one front: gRPC GenerateStream (grpc.aio) or POST /v1/completions with stream=true (httpx, SSE).
Rounds alternate between the fronts, --repeats times each; printed are the min and median of the
aggregate tokens/s and the median time to first token, and the HTTP/gRPC ratio of the medians. The
clients share the machine with the server, as they would on a one-box deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc
import httpx

from benchmarks.workload import SHARED_DATA
from protos import tandem_pb2, tandem_pb2_grpc
from serving.engine.config import EngineConfig
from serving.rpc.server import start_server

PROMPTS = ["Once upon a time", "Tom and Lily went to the park.", "The cat", "Ben had a red ball.", "Spot the dog",
           "There was a big tree near the house.", "Mom said, \"Let's bake a cake!\"", "One day, a little bird"]


def prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} {i}"


async def grpc_round(address: str, streams: int, tokens: int) -> tuple[float, list[float], int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)

        async def one(i: int) -> tuple[float, int]:
            start, first, n = time.perf_counter(), None, 0
            request = tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text=prompt(i))], params=tandem_pb2.SamplingParams(
                temperature=0, max_new_tokens=tokens, ignore_eos=True))
            async for delta in stub.GenerateStream(request):
                if first is None and delta.token_ids:
                    first = time.perf_counter() - start
                n += len(delta.token_ids)
            return first, n

        began = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(streams)))
        return time.perf_counter() - began, [r[0] for r in results], sum(r[1] for r in results)


async def http_round(base: str, model: str, streams: int, tokens: int) -> tuple[float, list[float], int]:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one(i: int) -> tuple[float, int]:
            start, first, n = time.perf_counter(), None, 0
            body = {"model": model, "prompt": prompt(i), "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and first is None and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
            return first, n

        began = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(streams)))
        return time.perf_counter() - began, [r[0] or 0.0 for r in results], sum(r[1] for r in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED_DATA / "models" / "tinystories-656k"))
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--token-budget", type=int, default=256)
    args = p.parse_args()
    server = start_server(EngineConfig(model=args.model, device="cpu", token_budget=args.token_budget,
                                       max_num_seqs=max(128, args.streams)), port=0, http_port=0,
                          max_concurrent_rpcs=max(256, 2 * args.streams))
    model = server.http.model_id
    figures: dict[str, list[tuple[float, float]]] = {"grpc": [], "http": []}
    try:
        asyncio.run(grpc_round(server.address, 4, 4))                                   # warm both paths
        asyncio.run(http_round(f"http://{server.http.address}", model, 4, 4))
        for _ in range(args.repeats):
            for front in ("grpc", "http"):
                if front == "grpc":
                    secs, ttfts, n = asyncio.run(grpc_round(server.address, args.streams, args.tokens))
                else:
                    secs, ttfts, n = asyncio.run(http_round(f"http://{server.http.address}", model, args.streams,
                                                            args.tokens))
                assert n == args.streams * args.tokens, f"{front}: {n} tokens, expected {args.streams * args.tokens}"
                figures[front].append((n / secs, statistics.median(ttfts)))
    finally:
        server.stop(grace=1.0)
    print(f"{args.streams} concurrent streams x {args.tokens} tokens, {args.repeats} interleaved rounds per front")
    print(f"{'front':6} {'tok/s min':>10} {'tok/s median':>13} {'TTFT median (ms)':>17}")
    medians = {}
    for front, rows in figures.items():
        rates = [r for r, _ in rows]
        medians[front] = statistics.median(rates)
        print(f"{front:6} {min(rates):10.0f} {medians[front]:13.0f} {statistics.median(t for _, t in rows) * 1e3:17.1f}")
    print(f"HTTP/gRPC throughput (medians): {medians['http'] / medians['grpc']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
