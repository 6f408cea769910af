"""`tandem serve --replicas R` and `tandem balance`: R engines behind one gRPC address.

`serve_replicas` starts R `tandem serve` processes (each on 127.0.0.1 with a free port, each with `--tp`
ranks of its own), waits until each prints its address, and runs a serving.fleet.balancer.Balancer on the
requested host:port in front of them. A replica that dies is not restarted: it leaves the rotation, and
when none is left the balancer reports NOT_SERVING and the command exits 1. SIGINT/SIGTERM stop the
balancer, then the replicas (SIGTERM: they finish their in-flight requests within the grace period).
`serve_balancer` is the front alone, over replicas started elsewhere.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from common.errors import ConfigError
from common.process import ServiceProcess, child_env
from protos.auth import ServerTLS
from serving.engine.config import EngineConfig
from serving.fleet.balancer import Balancer, BalancerConfig
from serving.launch import READY_PREFIX, START_TIMEOUT_S, server_command
from serving.options import engine_argv

log = logging.getLogger(__name__)



def replica_options(engine: EngineConfig, tp: int = 1, push_token_file: str | None = None,
                    grace_s: float = 10.0, server_options: list[str] = ()) -> list[str]:
    """The server options of one replica of `engine` (127.0.0.1, a free port); `server_options` (limits,
    swap timeout: serving.options.server_argv) are passed on as they are."""
    options = [*engine_argv(engine), "--host", "127.0.0.1", "--port", "0", "--grace-period", str(grace_s),
               "--cpu-bind", "off", *server_options]    # replicas share the machine's cores: none binds them alone
    if push_token_file:
        options += ["--push-token-file", push_token_file]
    if tp > 1:
        options += ["--tp", str(tp)]
    return options


def start_replicas(options: list[str], replicas: int,
                   timeout_s: float = START_TIMEOUT_S) -> list[ServiceProcess]:
    """Start `replicas` child servers with `options` (each prints its address; `.address` holds it).
    Each runs in its own session: a Ctrl-C on the terminal reaches the balancer only, which then stops
    the replicas gracefully."""
    procs = [ServiceProcess(f"replica {i}", server_command(*options), child_env(), ready_prefix=READY_PREFIX)
             for i in range(replicas)]
    try:
        for i, proc in enumerate(procs):
            try:
                line = proc.wait_ready(timeout_s)
            except RuntimeError:
                raise ConfigError("replicas", f"replica {i} did not start (exit code {proc.proc.poll()})") from None
            proc.address = line.rsplit(" on ", 1)[1].strip()
    except BaseException:
        stop_replicas(procs, grace_s=0)
        raise
    return procs


def stop_replicas(procs: list[ServiceProcess], grace_s: float) -> None:
    for proc in procs:
        proc.stop(grace=grace_s + 15)


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
                   ready: Callable[[Balancer], None] | None = None, server_options: list[str] = (),
                   tls: ServerTLS | None = None) -> int:
    """`tandem serve --replicas R`: R replica processes behind a balancer on host:port."""
    if replicas < 1:
        raise ConfigError("replicas", f"must be >= 1, got {replicas}")
    config = BalancerConfig(backends=["127.0.0.1:1"], host=host, port=port, push_token_file=push_token_file,
                            tls=tls or ServerTLS()).validate()     # the replicas themselves stay on loopback
    started = time.monotonic()
    procs = start_replicas(replica_options(engine, tp, push_token_file, grace_s, list(server_options)), replicas)
    addresses = [p.address for p in procs]
    log.info("%d replicas up in %.1f s: %s", replicas, time.monotonic() - started, ", ".join(addresses))
    config.backends = addresses
    try:
        return serve_balancer(config, ready, replicas_alive=lambda: any(p.running for p in procs))
    finally:
        stop_replicas(procs, grace_s)
