"""The one way to start a server as a child process: `python -m serving ...` in its own session, read
until it prints `serving ... on HOST:PORT`. Used by replicas, `tandem up` and the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

from common.process import ServiceProcess, child_env

READY_PREFIX = "serving "
START_TIMEOUT_S = 300.0


def server_command(*options: str) -> list[str]:
    """The command line of a child server with `options` (those of serving.options)."""
    return [sys.executable, "-m", "serving", *options]


def start_server(options: list[str], *, name: str = "server", env: dict[str, str] | None = None,
                 log_file: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> ServiceProcess:
    """Start a child server (bind `--port 0` to get a free port) and wait until it serves; `.address`
    holds HOST:PORT. RuntimeError with the tail of its log if it exits or times out first."""
    proc = ServiceProcess(name, server_command(*options), env if env is not None else child_env(),
                          log_file=log_file, ready_prefix=READY_PREFIX)
    line = proc.wait_ready(timeout_s)
    proc.address = line.rsplit(" on ", 1)[1].strip()
    return proc
