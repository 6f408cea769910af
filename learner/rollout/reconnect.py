"""Surviving the generation server, learner side: which failures mean "the server is gone", bounded back-off
while it is, and how a restart is told apart from a blip.

    watch = ServerWatch("127.0.0.1:50051", down_limit_s=300)
    state = watch.wait_up()                 # None after down_limit_s of back-off (the caller raises ServerDown)
    if watch.restarted(state, learner_version): ...   # re-push, drop the old process's rollouts
    watch.adopt(state)

A call that fails with UNAVAILABLE, a passed deadline or a stream the server cut off (CANCELLED, which the
learner never causes on a call it still reads) is transient: the server died, restarts or is overloaded.
`wait_up` then asks for its status (every probe on a fresh channel, with a STATUS_TIMEOUT_S deadline, so a
channel's own reconnect back-off never hides a server that is back) after BACKOFF_FIRST_S, doubling up to
BACKOFF_MAX_S, for at most `down_limit_s` (PPOConfig.server_down_limit_s). Every other code is an error of
the request and is raised as it is.

A restart is a server that answers with another instance id (ServerStatus.instance_id, random per process)
and has been up for less time than has passed since the previous one last answered (so a long-running
replica behind a balancer is not mistaken for a restart), or one that reports a weight version below the
learner's (it lost the weights the learner pushed). Policy only: learner.rollout.server_link acts on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from clients.client import TandemClient
from clients.results import Status, TandemError

log = logging.getLogger(__name__)

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
STATUS_TIMEOUT_S = 10.0     # the deadline of one status query
BACKOFF_FIRST_S = 0.25      # the first wait before asking a gone server again
BACKOFF_MAX_S = 5.0         # the longest wait between two questions
UPTIME_SLACK_S = 1.0        # a new instance up for less than (time since the old one answered + this) restarted


class ServerDown(RuntimeError):
    """The server stayed unreachable past the learner's limit; the message names the server and the limit."""

    def __init__(self, server: str, limit_s: float, last_error: str):
        super().__init__(f"the generation server at {server} stayed unreachable for more than "
                         f"server_down_limit_s={limit_s:g} s (last error: {last_error}); giving up")
        self.server, self.limit_s, self.last_error = server, limit_s, last_error


def is_transient(err: BaseException) -> bool:
    """Whether a failed call means the server is gone (retry after it is back) rather than a bad request."""
    return isinstance(err, TandemError) and err.code in TRANSIENT


@dataclass
class ServerState:
    """What one status answer says about the process behind the address."""

    version: int                # the weight version in force
    instance: str               # its instance id ("" from a server that does not report one)
    uptime_s: float
    seen_at: float              # time.monotonic() here when the answer came

    @classmethod
    def from_status(cls, status: Status, seen_at: float) -> ServerState:
        return cls(status.weight_version, status.instance_id, status.uptime_s, seen_at)


class ServerWatch:
    """The learner's view of one server: the last state it saw, probes, waiting, restart detection."""

    def __init__(self, server: str, *, down_limit_s: float, credentials=None,
                 status_timeout_s: float = STATUS_TIMEOUT_S, sleep: Callable[[float], None] = time.sleep):
        self.server, self.down_limit_s, self.credentials = server, down_limit_s, credentials
        self.status_timeout_s, self.sleep = status_timeout_s, sleep
        self.last: ServerState | None = None
        self.last_error = ""

    def probe(self) -> ServerState:
        """One status query on a fresh channel (TandemError when it fails)."""
        with TandemClient(self.server, credentials=self.credentials) as client:
            status = client.status(timeout=self.status_timeout_s)
        return ServerState.from_status(status, time.monotonic())

    def wait_up(self) -> ServerState | None:
        """Probe with exponential back-off until the server answers; None once down_limit_s has passed."""
        deadline = time.monotonic() + self.down_limit_s
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return self.probe()
            except TandemError as err:
                if not is_transient(err):
                    raise
                self.last_error = f"{err.code.name}: {err.details}"
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            log.info("server %s unreachable (%s): asking again in %.2f s (%.0f s left)", self.server,
                     self.last_error, min(delay, left), left)
            self.sleep(min(delay, left))
            delay = min(2 * delay, BACKOFF_MAX_S)

    def down(self) -> ServerDown:
        return ServerDown(self.server, self.down_limit_s, self.last_error or "no answer")

    def restarted(self, state: ServerState, learner_version: int) -> bool:
        """Whether `state` comes from a process other than the one last seen, started since (or one that lost
        the learner's weights)."""
        if self.last is None:
            return False
        if state.version < learner_version:
            return True
        if state.instance and self.last.instance and state.instance != self.last.instance:
            return state.uptime_s <= state.seen_at - self.last.seen_at + UPTIME_SLACK_S
        return False

    def adopt(self, state: ServerState) -> None:
        self.last = state
