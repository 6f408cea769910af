"""Where a CPU server's threads run: the engine thread on cores of its own, the front on the others.

On CPU the engine thread is compute-bound while the front (gRPC and HTTP handlers, their pollers) wakes
in bursts, 64 handlers at once after every step. Left to the OS scheduler, those bursts preempt the
engine on its core; the engine then also waits for the interpreter lock that a handler holds. With
`cpu_bind` the engine thread, and the OpenMP threads it starts, run on the first `torch threads` cores
the process may use, and every other thread (those there now and those started later, which inherit
it) on the rest. vLLM's CPU backend binds its workers' threads likewise and keeps cores for its front
(VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU).

`cpu_bind` is "auto" (bind when the engine's threads leave at least one core free), "off", or the
engine's cores as a list such as "0" or "0-3,8" (the front gets the remaining allowed cores). Linux
only: elsewhere "auto" does nothing and a core list is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from common.errors import ConfigError

log = logging.getLogger(__name__)


def parse_cores(text: str) -> frozenset[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}; raises ConfigError("cpu_bind", ...) naming what is wrong."""
    cores: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ConfigError("cpu_bind", f"must be auto, off or a core list like 0-3,8; got {text!r}") from None
        if first < 0 or last < first:
            raise ConfigError("cpu_bind", f"bad core range {part.strip()!r} in {text!r}")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def check(cpu_bind: str) -> None:
    """Validate the setting alone (ServerConfig.validate); the cores themselves are checked by `plan`."""
    if cpu_bind not in ("auto", "off"):
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError("cpu_bind", "a core list needs Linux (sched_setaffinity)")
        parse_cores(cpu_bind)


@dataclass(frozen=True)
class Placement:
    engine: frozenset[int]
    front: frozenset[int]

    def describe(self) -> str:
        return f"engine thread on cpu {_ranges(self.engine)}, front on cpu {_ranges(self.front)}"


def plan(cpu_bind: str, threads: int, allowed: set[int] | None = None) -> Placement | None:
    """The placement for an engine of `threads` torch threads, or None (leave the scheduler alone)."""
    if cpu_bind == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = set(os.sched_getaffinity(0) if allowed is None else allowed)
    ordered = sorted(allowed)
    if cpu_bind == "auto":
        if threads >= len(ordered):
            return None              # the engine takes every core: nothing is left to keep the front apart
        engine = frozenset(ordered[:threads])
    else:
        engine = parse_cores(cpu_bind)
        if not engine <= allowed:
            raise ConfigError("cpu_bind", f"cpu {_ranges(engine - allowed)} not among the cores this process "
                                          f"may use ({_ranges(allowed)})")
    front = frozenset(allowed - engine) or engine
    return Placement(engine, front)


class Binding:
    """Applies a Placement to this process: `bind_front()` (every thread now running, from the thread
    that starts the server), `bind_engine()` (on the engine thread), `restore()` (the masks the front's
    threads had, so an in-process server leaves its caller as it found it)."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self._saved: dict[int, set[int]] = {}

    def bind_front(self) -> None:
        for tid in _threads():
            try:
                self._saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, self.placement.front)
            except OSError:          # the thread ended meanwhile
                self._saved.pop(tid, None)
        log.info("cpu placement: %s", self.placement.describe())

    def bind_engine(self) -> None:
        try:
            os.sched_setaffinity(0, self.placement.engine)
        except OSError as err:       # the cpuset changed since the plan: serve unbound rather than not at all
            log.warning("cpu placement: cannot bind the engine thread to cpu %s (%s); it runs unbound",
                        _ranges(self.placement.engine), err)

    def restore(self) -> None:
        saved, self._saved = self._saved, {}
        for tid, mask in saved.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _ranges(cores) -> str:
    ordered, out = sorted(cores), []
    for c in ordered:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
