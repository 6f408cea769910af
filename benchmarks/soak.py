"""Soak: N concurrent streaming clients that cancel, run out of deadline and read slowly, plus a weight push
every few seconds, against one real server child process for T minutes (bounded). Then a swap under load.

    python -m benchmarks.soak --model PATH --streams 16 --minutes 2 --push-every 5
    python -m benchmarks.soak --model PATH --swap-probe-only

Prints requests served, errors by status code, KV blocks leaked (after the server settles), server RSS at
start and end, p50/p95 latency of completed requests, versions pushed. The swap probe (`--swap-timeout 2`):
while a 400-token request runs, a push is sent, and new short requests measure how long they wait beyond
their own work (compared with the same request on the idle server).
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from clients.weight_push import hf_tensors, push_weights
from common.files import write_private
from common.process import child_env
from protos import tandem_pb2, tandem_pb2_grpc
from serving.launch import start_server

PROMPT = [1, 300, 400, 17]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gen(prompt, n: int, temperature: float = 0.8) -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=prompt))],
                                      params=tandem_pb2.SamplingParams(temperature=temperature, max_new_tokens=n,
                                                                       ignore_eos=True))


def status(stub) -> tandem_pb2.ServerStatus:
    return stub.GetStatus(tandem_pb2.StatusRequest(), timeout=30)


def settle(stub, timeout: float = 60.0) -> tandem_pb2.ServerStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = status(stub)
        if (s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


class Soak:
    def __init__(self, stub, seconds: float, seed: int):
        self.stub = stub
        self.end = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.kinds: Counter = Counter()
        self.latency: list[float] = []
        self.served = 0
        self.seed = seed

    def client(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while time.monotonic() < self.end:
            kind = rng.choice(["full", "full", "cancel", "deadline", "slow"])
            n = rng.randint(8, 200)
            prompt = [1] + [rng.randrange(2, 2048) for _ in range(rng.randint(3, 60))]
            started = time.monotonic()
            code = "OK"
            call = self.stub.GenerateStream(gen(prompt, n), timeout=rng.uniform(0.05, 1.5) if kind == "deadline" else 120)
            try:
                for k, _ in enumerate(call):
                    if kind == "cancel" and k >= rng.randint(0, 20):
                        call.cancel()
                        code = "CANCELLED (by client)"
                        break
                    if kind == "slow":
                        time.sleep(rng.uniform(0.005, 0.05))
            except grpc.RpcError as err:
                code = err.code().name
            with self.lock:
                self.kinds[kind] += 1
                self.codes[code] += 1
                if code == "OK":
                    self.served += 1
                    self.latency.append(time.monotonic() - started)

    def pusher(self, address: str, token: str, model: str, every: float, versions: list[int]) -> None:
        tensors = list(hf_tensors(model))
        while not _sleep_until(min(time.monotonic() + every, self.end), self.end):
            version = status(self.stub).weight_version + 1
            try:
                push_weights(address, tensors, token=token, version=version, origin=f"soak v{version}", timeout=120)
                versions.append(version)
            except Exception as err:  # noqa: BLE001 - counted, not fatal
                with self.lock:
                    self.codes[f"push {type(err).__name__}"] += 1


def _sleep_until(t: float, end: float) -> bool:
    """Sleep until t; True when the soak is over."""
    time.sleep(max(0.0, t - time.monotonic()))
    return time.monotonic() >= end


def swap_probe(stub, address: str, token: str, model: str) -> dict:
    """New requests' wait while a push is held behind a 400-token request (server --swap-timeout 2)."""
    short = gen(PROMPT, 8, temperature=0)
    own = min(_timed(lambda: stub.Generate(short, timeout=60)) for _ in range(5))
    long = stub.GenerateStream(gen(PROMPT, 400, temperature=0), timeout=120)
    next(long)
    long_started = time.monotonic()
    version = status(stub).weight_version + 1
    pushed: dict = {}
    pusher = threading.Thread(target=lambda: pushed.update(report=push_weights(
        address, hf_tensors(model), token=token, version=version, origin="swap probe", timeout=120)))
    pusher.start()
    time.sleep(0.3)                      # the push is staged and held by now
    waits = []
    for _ in range(3):
        waits.append(_timed(lambda: stub.Generate(short, timeout=60)) - own)
    long_code = "OK"
    try:
        for _ in long:
            pass
    except grpc.RpcError as err:
        long_code = err.code().name
    long_s = time.monotonic() - long_started
    pusher.join(120)
    return {"own_work_s": own, "first_new_request_wait_s": waits[0], "later_waits_s": waits[1:],
            "long_request_end": long_code, "long_request_s": long_s, "pushed_version": version,
            "push_swap_s": getattr(pushed.get("report"), "swap_s", None)}


def _timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--push-every", type=float, default=5.0, metavar="S")
    p.add_argument("--swap-timeout", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swap-probe-only", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 60:
        p.error("--minutes: must be in (0, 60]")
    with tempfile.TemporaryDirectory() as tmp:
        token = secrets.token_hex(16)
        token_file = write_private(Path(tmp) / "token", token)
        server = start_server(["--model", args.model, "--port", "0", "--device", "cpu", "--push-token-file",
                               str(token_file), "--swap-timeout", str(args.swap_timeout)],
                              env=child_env(OMP_NUM_THREADS="1"), log_file=Path(tmp) / "server.log")
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = tandem_pb2_grpc.GenerationStub(channel)
                if not args.swap_probe_only:
                    soak(stub, server, token, args)
                probe = swap_probe(stub, server.address, token, args.model)
                print(f"swap under load (--swap-timeout {args.swap_timeout:g}, a 400-token request running): "
                      f"new request's own work {probe['own_work_s'] * 1e3:.0f} ms, first new request waited "
                      f"{probe['first_new_request_wait_s']:.2f} s more, later ones "
                      f"{', '.join(f'{w:.2f}' for w in probe['later_waits_s'])} s; the 400-token request ended "
                      f"{probe['long_request_end']} after {probe['long_request_s']:.2f} s; v{probe['pushed_version']} "
                      f"swapped in {probe['push_swap_s'] or float('nan'):.3f} s", flush=True)
        finally:
            server.stop(5.0)
    return 0


def soak(stub, server, token: str, args) -> None:
    settle(stub)
    rss_start = rss_mb(server.proc.pid)
    run = Soak(stub, args.minutes * 60, args.seed)
    versions: list[int] = []
    threads = [threading.Thread(target=run.client, args=(i,), daemon=True) for i in range(args.streams)]
    threads.append(threading.Thread(target=run.pusher, args=(server.address, token, args.model, args.push_every,
                                                               versions), daemon=True))
    samples: list[tuple[float, float]] = []                    # (seconds into the soak, RSS MB)

    def sample_rss() -> None:
        began = time.monotonic()
        while not _sleep_until(time.monotonic() + 10, run.end):
            samples.append((time.monotonic() - began, rss_mb(server.proc.pid)))

    threads.append(threading.Thread(target=sample_rss, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = settle(stub)
    rss_end = rss_mb(server.proc.pid)
    lat = sorted(run.latency)
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
    print(f"soak: {args.streams} streams, {args.minutes:g} min, push every {args.push_every:g} s, "
          f"swap timeout {args.swap_timeout:g} s", flush=True)
    print(f"  requests served (completed): {run.served}; by client behaviour: {dict(run.kinds)}")
    print(f"  outcomes by status code: {dict(run.codes)}")
    print(f"  KV blocks leaked: {end.kv_blocks_total - end.kv_blocks_free} of {end.kv_blocks_total}; "
          f"running {end.running}, waiting {end.waiting}; server alive: {server.running}")
    print(f"  server RSS: {rss_start:.0f} MB at start, {rss_end:.0f} MB at end "
          f"({(rss_end / rss_start - 1) * 100:+.1f}%)")
    warm = next((mb for s, mb in samples if s >= 60), None)     # after the first minute: warm-up done
    if warm is not None:
        every_minute = [f"{mb:.0f}" for s, mb in samples if int(s) % 60 < 10]
        print(f"  server RSS each minute: {', '.join(every_minute)} MB; after the first minute {warm:.0f} -> "
              f"{rss_end:.0f} MB ({(rss_end / warm - 1) * 100:+.1f}%)")
    print(f"  latency of completed streams: p50 {p50:.2f} s, p95 {p95:.2f} s")
    print(f"  versions pushed: {len(versions)} (last v{versions[-1] if versions else 0}); weight version in force "
          f"v{end.weight_version}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
