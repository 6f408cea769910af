"""A child service (a server, a learner, a replica): started in its own process group, so a
terminal's Ctrl-C reaches only the parent, which then stops its children in order and by their id."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


# A process group's variables: a child must form its own group, not join (or re-bind the port of) ours.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without a process group's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


class ServiceProcess:
    """`command` as a child in a new session. With `ready_prefix`, its stdout is read for the line that
    says it is ready (`wait_ready`); with `log_file`, its stderr goes there."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], *, log_file: Path | None = None,
                 ready_prefix: str | None = None):
        self.name, self.command, self.log_file = name, command, log_file
        self.address = ""
        self._ready_prefix = ready_prefix
        self._ready_line: str | None = None
        self._ready = threading.Event()
        self._log = open(log_file, "w", encoding="utf-8") if log_file else None
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE if ready_prefix else None,
                                     stderr=self._log, text=True, start_new_session=True)
        if ready_prefix:
            threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:          # drained to the end, so the child never blocks on a full pipe
            if self._ready_line is None and line.startswith(self._ready_prefix):
                self._ready_line = line.strip()
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> str:
        """The ready line; RuntimeError (with the tail of the log) if the child exits or times out first."""
        self._ready.wait(timeout)
        if self._ready_line is None:
            code = self.proc.poll()
            self.stop(grace=2.0)
            why = f"exited with status {code}" if code is not None else f"was not ready within {timeout:.0f} s"
            raise RuntimeError(f"the {self.name} {why}: {' '.join(self.command)}\n{self.log_tail()}")
        return self._ready_line

    def log_tail(self, lines: int = 20) -> str:
        if self.log_file is None or not Path(self.log_file).is_file():
            return ""
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        return self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)      # the child leads its own group (start_new_session)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the child's group (a server shuts down gracefully), SIGKILL after `grace` s."""
        if self.running:
            log.info("stopping the %s (pid %d)", self.name, self.proc.pid)
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.running and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running:
                self._signal(signal.SIGKILL)
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode
