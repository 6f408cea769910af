"""`tandem serve --replicas R` and `tandem balance`: R engines behind one gRPC address.

`serve_replicas` starts R `tandem serve` processes (each on 127.0.0.1 with a free port, each with `--tp`
ranks of its own), waits until each prints its address, and runs a serving.balancer.Balancer on the
requested host:port in front of them. A replica that dies is not restarted: it leaves the rotation, and
when none is left the balancer reports NOT_SERVING and the command exits 1. SIGINT/SIGTERM stop the
balancer, then the replicas (SIGTERM: they finish their in-flight requests within the grace period).
`serve_balancer` is the front alone, over replicas started elsewhere.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from serving.balancer import Balancer, BalancerConfig
from serving.config import EngineConfig
from serving.errors import ConfigError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0


def replica_argv(engine: EngineConfig, tp: int = 1, push_token_file: str | None = None,
                 grace_s: float = 10.0) -> list[str]:
    """The `tandem serve` command line of one replica of `engine` (127.0.0.1, a free port)."""
    argv = [sys.executable, "-m", "clients.cli", "serve", "--model", engine.model, "--host", "127.0.0.1",
            "--port", "0", "--dtype", engine.dtype, "--device", engine.device,
            "--token-budget", str(engine.token_budget), "--block-size", str(engine.block_size),
            "--kv-blocks", str(engine.num_kv_blocks), "--max-num-seqs", str(engine.max_num_seqs),
            "--max-model-len", str(engine.max_model_len), "--grace-period", str(grace_s)]
    if engine.tokenizer:
        argv += ["--tokenizer", engine.tokenizer]
    if not engine.enable_prefix_caching:
        argv.append("--no-prefix-caching")
    if push_token_file:
        argv += ["--push-token-file", push_token_file]
    if tp > 1:
        argv += ["--tp", str(tp)]
    return argv


def start_replicas(argv: list[str], replicas: int, timeout_s: float = START_TIMEOUT_S) -> tuple[list[subprocess.Popen], list[str]]:
    """Start `replicas` copies of `argv` (a `tandem serve --port 0` command); return them and their addresses."""
    # own sessions: a Ctrl-C on the terminal reaches the balancer only, which then stops the replicas gracefully
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True) for _ in range(replicas)]
    addresses: list[str] = []
    try:
        for i, proc in enumerate(procs):
            line = _read_line(proc, timeout_s)
            if " on " not in line:
                raise ConfigError("replicas", f"replica {i} did not start (exit code {proc.poll()})")
            addresses.append(line.split()[-1])
    except BaseException:
        stop_replicas(procs, grace_s=0)
        raise
    return procs, addresses


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = [""]
    reader = threading.Thread(target=lambda: box.__setitem__(0, proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0]


def stop_replicas(procs: list[subprocess.Popen], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace_s + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_replicas(balancer: Balancer, timeout_s: float) -> None:
    """Block until every replica answers SERVING (or raise TimeoutError naming those that do not)."""
    deadline = time.monotonic() + timeout_s
    while balancer.healthy_count() < len(balancer.replicas):
        if time.monotonic() > deadline:
            down = [r.address for r in balancer.replicas if not r.healthy]
            raise TimeoutError(f"replicas not serving after {timeout_s:.0f} s: {', '.join(down)}")
        balancer.probe_all()
        time.sleep(0.1)


def serve_balancer(config: BalancerConfig, ready: Callable[[Balancer], None] | None = None,
                   replicas_alive: Callable[[], bool] | None = None) -> int:
    """Run a Balancer until SIGINT/SIGTERM (0) or until every replica is gone for good (1)."""
    balancer = Balancer(config)
    balancer.start()
    wait_for_replicas(balancer, timeout_s=START_TIMEOUT_S)
    done = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: done.set())
    if ready is not None:
        ready(balancer)
    code = 0
    while not done.wait(0.5):
        if replicas_alive is not None and not replicas_alive():
            log.error("every replica has exited: NOT_SERVING")
            code = 1
            break
    balancer.stop(grace=5.0)
    return code


def serve_replicas(engine: EngineConfig, host: str, port: int, replicas: int, tp: int = 1,
                   push_token_file: str | None = None, grace_s: float = 10.0,
                   ready: Callable[[Balancer], None] | None = None) -> int:
    """`tandem serve --replicas R`: R replica processes behind a balancer on host:port."""
    if replicas < 1:
        raise ConfigError("replicas", f"must be >= 1, got {replicas}")
    config = BalancerConfig(backends=["127.0.0.1:1"], host=host, port=port).validate()
    started = time.monotonic()
    procs, addresses = start_replicas(replica_argv(engine, tp, push_token_file, grace_s), replicas)
    log.info("%d replicas up in %.1f s: %s", replicas, time.monotonic() - started, ", ".join(addresses))
    config.backends = addresses
    try:
        return serve_balancer(config, ready, replicas_alive=lambda: any(p.poll() is None for p in procs))
    finally:
        stop_replicas(procs, grace_s)
