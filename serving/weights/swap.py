"""Swapping a staged update into the engine between two scheduler steps, atomically.

In-flight policy: **drain**. When a verified update is waiting, the engine loop stops adding new
batches to the engine (they are held, in order), lets every request already in the engine finish on
the old weights, and swaps the moment the engine is idle: load the weights (all-or-nothing), bump
`weight_version`, set `weight_origin`, reset the prefix cache (cached keys/values belong to the old
weights); then the held batches go in. So every completion is produced wholly by the version it
reports, and nothing is recomputed. The price is a pause for new requests as long as the longest
request already running; requests in flight never see a change.

The pause is bounded: an update that has waited `swap_timeout_s` for the engine to drain makes the loop
finish every request still in the engine as "abort" (the client gets ABORTED saying the weight swap's
deadline passed; nothing it received was produced by mixed weights), and the swap goes ahead. So new
requests wait at most the timeout plus the swap itself.

A failure while writing (out of memory, a device error) rolls back: the values of every parameter the
update touches are copied before the first write and written back, and the version stays as it was.

LoRA: served = base + scale * B @ A for every adapted matrix, where `base` is the value the matrix had
before the first LoRA push touched it (snapshotted then, dropped when a full push replaces the matrix).
Adapters are cumulative relative to that base, not increments: each LoRA push is the whole adapter
state, and a matrix adapted before but absent from the new push goes back to its base.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from common.errors import InvalidRequest
from serving.weights.stage import StagedUpdate

log = logging.getLogger(__name__)

POLICIES = ("drain",)


@dataclass
class SwapResult:
    version: int
    swap_s: float       # the pause between two steps while the weights were written
    wait_s: float       # from the request until the engine had drained


class WeightUpdater:
    """Writes staged updates into an engine's model runner. Call only from the engine's thread."""

    def __init__(self, engine):
        self.engine = engine
        self.lora_base: dict[str, torch.Tensor] = {}   # matrices under an adapter -> their base value

    def apply(self, update: StagedUpdate) -> float:
        """Swap the update in (all-or-nothing); returns the seconds it took. Raises InvalidRequest/FieldError."""
        engine = self.engine
        if update.version <= engine.weight_version:
            raise InvalidRequest("header.version", f"must be greater than the version in force "
                                                   f"({engine.weight_version}), got {update.version}")
        started = time.perf_counter()
        if update.lora:
            writes, snapshots = self._lora_writes(update)
            self._write_or_roll_back([w[0] for w in writes], writes)
            for target in [t for t in self.lora_base if t not in update.deltas]:
                del self.lora_base[target]              # back on its base: no longer adapted
            self.lora_base.update(snapshots)
        else:
            self._check_tied(update.tensors)
            self._write_or_roll_back(list(update.tensors), list(update.tensors.items()))
            for name in update.tensors:
                self.lora_base.pop(name, None)          # the pushed value is the new base
        engine.weight_version = update.version
        engine.weight_origin = update.origin or f"push v{update.version}"
        engine.reset_prefix_cache()
        swap_s = time.perf_counter() - started
        log.info("weights v%d in force (%s, %d tensors, %s) in %.3f s", update.version, engine.weight_origin,
                 update.num_tensors, "LoRA" if update.lora else "full", swap_s)
        return swap_s

    def _current(self, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        """CPU copies of the values in force for `names` (a TP runner gathers them from its ranks' shards)."""
        full = getattr(self.engine.runner, "full_parameter", None)
        table = self.engine.runner.model.parameter_table()
        return [(n, (full(n) if full is not None else table[n].detach()).to("cpu", copy=True)) for n in names]

    def _write_or_roll_back(self, names: list[str], writes: list[tuple[str, torch.Tensor]]) -> None:
        """Write every tensor or, when a write fails part way, put back the values in force before it."""
        before = self._current(names)
        try:
            self.engine.runner.load_weights(writes)
        except BaseException as err:
            log.error("writing weights failed (%s: %s): rolling back %d tensors", type(err).__name__, err, len(before))
            self.engine.runner.load_weights(before)
            raise

    def _check_tied(self, tensors: dict[str, torch.Tensor]) -> None:
        """A tied matrix pushed under both of its names must carry one value, or the result is ambiguous."""
        first: dict[int, str] = {}
        for name, param in self.engine.runner.model.parameter_table().items():
            if name in tensors:
                other = first.setdefault(id(param), name)
                if other != name and not torch.equal(tensors[other], tensors[name]):
                    raise InvalidRequest(name, f"is tied to {other} but was pushed with a different value")

    def _lora_writes(self, update: StagedUpdate) -> tuple[list[tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
        table = self.engine.runner.model.parameter_table()
        writes, snapshots = [], {}
        for target, delta in update.deltas.items():
            base = self.lora_base.get(target)
            if base is None:
                full = getattr(self.engine.runner, "full_parameter", None)   # TP: gathered from the ranks' shards
                value = full(target) if full is not None else table[target].detach()
                base = snapshots[target] = value.to("cpu", copy=True)
            writes.append((target, base.float() + delta))
        for target, base in self.lora_base.items():
            if target not in update.deltas:
                writes.append((target, base))
        return writes, snapshots


class WeightSwapper:
    """Queues verified updates and applies them under the drain policy.

    Any thread: `request(update)` returns a Future of SwapResult. The engine loop: defer new batches
    while `holding`, and call `before_step(engine)` after every step (and when woken): it swaps once the
    engine has no unfinished request, and returns True when it did (the loop then adds the held batches).
    """

    def __init__(self, updater: WeightUpdater, policy: str = "drain", swap_timeout_s: float = 30.0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not swap_timeout_s >= 0:
            raise ValueError(f"swap_timeout_s must be >= 0, got {swap_timeout_s}")
        self.updater = updater
        self.policy = policy
        self.swap_timeout_s = swap_timeout_s
        self._lock = threading.Lock()
        self._pending: list[tuple[StagedUpdate, Future, float]] = []

    @property
    def holding(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def request(self, update: StagedUpdate) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending.append((update, future, time.perf_counter()))
        return future

    def overdue(self) -> str | None:
        """Once the oldest pending update has waited longer than swap_timeout_s: why the requests still
        running are ended (the loop finishes them as "abort"); else None."""
        with self._lock:
            if not self._pending:
                return None
            update, _, requested = self._pending[0]
        waited = time.perf_counter() - requested
        if waited < self.swap_timeout_s:
            return None
        return (f"aborted for the swap to weight version {update.version}: it waited {waited:.1f} s for running "
                f"requests, the swap timeout is {self.swap_timeout_s:g} s")

    def withdraw(self, future: Future) -> bool:
        """Drop a request that has not been applied yet (the pusher went away); True if it was dropped."""
        with self._lock:
            kept = [p for p in self._pending if p[1] is not future]
            dropped = len(kept) != len(self._pending)
            self._pending = kept
        if dropped:
            future.cancel()
        return dropped

    def before_step(self, engine) -> bool:
        """Engine thread: apply every pending update if the engine has drained; True when any was applied."""
        if engine.has_unfinished_requests():
            return False
        with self._lock:
            pending, self._pending = self._pending, []
        for update, future, requested in pending:
            if not future.set_running_or_notify_cancel():
                continue
            waited = time.perf_counter() - requested
            try:
                swap_s = self.updater.apply(update)
            except Exception as err:  # noqa: BLE001 - the pusher gets it; the old version stays in force
                log.warning("weight push v%d rejected at swap: %s", update.version, err)
                future.set_exception(err)
            else:
                future.set_result(SwapResult(update.version, swap_s, waited))
        return bool(pending)

    def fail_pending(self, error: BaseException) -> None:
        """The engine is stopping: every queued update is refused with `error`."""
        with self._lock:
            pending, self._pending = self._pending, []
        for _, future, _ in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
