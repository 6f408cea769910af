"""Concurrent streaming gRPC clients in their own process: what `benchmarks.serving --clients N` measures.

    python -m benchmarks.stream_clients --address HOST:PORT --requests FILE.json --clients N

FILE holds `[{"prompt_ids": [...], "max_new_tokens": K}, ...]`; client i sends requests i, i+N, i+2N, ...
one after another, greedy with EOS ignored. Prints one JSON line: tokens/s over the wall time from the
first request to the last token, and TTFT and inter-token latency p50/p95 in ms. Every client connects
(and sees the server SERVING) before the clock starts, and all start together: the figure is the
server's, not that of 64 channels being set up.

The clients run in a process of their own, as real clients do: in the server's process their threads
would share its interpreter lock with the engine and the gRPC handlers and charge their own protobuf
parsing to the server.
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def run_clients(address: str, requests: list[dict], clients: int) -> dict:
    from clients.client import TandemClient

    ttft, itl = [], []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)

    def worker(share: list[dict]) -> None:
        with TandemClient(address) as client:
            client.wait_ready()
            go.wait()
            for r in share:
                t0 = time.perf_counter()
                last = None
                for delta in client.generate_stream(r["prompt_ids"], temperature=0.0,
                                                    max_new_tokens=r["max_new_tokens"], ignore_eos=True):
                    now = time.perf_counter()
                    if not delta.token_ids:
                        continue
                    with lock:
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append((now - last) / len(delta.token_ids))
                    last = now

    threads = [threading.Thread(target=worker, args=(requests[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"ttft_p50_ms": percentile(ttft, 0.5) * 1000, "ttft_p95_ms": percentile(ttft, 0.95) * 1000,
            "itl_p50_ms": percentile(itl, 0.5) * 1000, "itl_p95_ms": percentile(itl, 0.95) * 1000,
            "tokens_per_s": sum(r["max_new_tokens"] for r in requests) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--requests", required=True, help="a JSON file of prompt_ids / max_new_tokens")
    parser.add_argument("--clients", type=int, required=True)
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    with open(args.requests) as f:
        requests = json.load(f)
    print(json.dumps(run_clients(args.address, requests, args.clients)), flush=True)


if __name__ == "__main__":
    main()
