"""The one thread that owns the LLMEngine and drives `step()`.

The engine is not thread-safe, so only this thread touches it. gRPC handler threads submit batches,
aborts and calls as commands; the loop applies them between two steps, in order, and hands each
request's outputs to the queue of the batch it came in (a `RequestStream`). When there is nothing to
do the loop sleeps on a condition variable: no busy spin.

An optional `gate` lets a weight update wait for a drained engine (serving.weights.swap.WeightSwapper
fits): while `gate.holding`, new batches are held back; `gate.before_step(engine)` runs after every
step and whenever the loop wakes, and returns True once it has applied its update, which releases the
held batches; `gate.fail_pending(error)` refuses what is still queued when the loop stops; and
`gate.overdue()` (optional) returns a message once a held update has waited longer than its timeout:
the loop then finishes every request still in the engine as "abort" with that message.

A slow reader costs bounded memory: a RequestStream keeps at most one unread output per prompt, merging
the newer output into the unread one (deltas concatenated, totals from the newer), so however far behind
its client is, a stream holds one entry per prompt and the engine never waits for it.

An optional `on_start()` runs first thing on the engine thread (serving.placement binds it to its cores
there); if it raises, the loop is dead before its first step.

An optional `observer` (serving.metrics.EngineMetrics fits) is told, on the engine thread, of every
request added (`on_added(request_id, arrival)`), every step (`on_step(engine, outputs, started)`) and every
abort (`on_aborted(request_id)`); it must be quick and must not raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from common.errors import InvalidRequest
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class PromptRefused(InvalidRequest):
    """LLMEngine.add_request refused prompt `index` of a batch; `field` is the engine's own name for the
    offending value (a front maps it onto its request schema)."""

    def __init__(self, index: int, err: InvalidRequest):
        super().__init__(err.field, err.message)
        self.index = index


class EngineDead(RuntimeError):
    """The engine thread has stopped (crashed or shut down); no request can be served."""


_CANCELLED = object()


class RequestStream:
    """The outputs of one submitted batch: `(index, RequestOutput)` pairs, as the engine makes them."""

    def __init__(self, request_ids: Sequence[str]):
        self.request_ids = list(request_ids)
        self.cancelled = False
        self.finished = False
        self.arrival = time.monotonic()       # queue and latency figures count from here
        self._loop: EngineLoop | None = None
        self._ready = threading.Condition()
        self._order: deque = deque()                   # prompt indices with an unread output, errors, _CANCELLED
        self._unread: dict[int, RequestOutput] = {}    # at most one unread output per prompt

    def put(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        with self._ready:
            if isinstance(item, tuple):
                index, out = item
                earlier = self._unread.get(index)
                if earlier is None:
                    self._order.append(index)
                self._unread[index] = out if earlier is None else out.after(earlier)
            else:
                self._order.append(item)
            self._ready.notify()

    @property
    def unread(self) -> int:
        """Items waiting for the reader (at most one output per prompt, plus an error or the cancel mark)."""
        with self._ready:
            return len(self._order)

    def _get(self):
        with self._ready:
            while not self._order:
                self._ready.wait()
            item = self._order.popleft()
            if isinstance(item, int):
                return item, self._unread.pop(item)
            return item

    def cancel(self) -> None:
        """Abort every request of the batch (frees its KV blocks at the next step boundary) and stop
        iteration. Safe to call from any thread, more than once, before or after submission."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        if self._loop is not None:
            try:
                self._loop.abort(self.request_ids, owner=self)
            except EngineDead:
                pass                     # nothing runs any more
        RequestStream.put(self, _CANCELLED)      # this stream's own reader (subclasses may route put elsewhere)

    def __iter__(self) -> Iterator[tuple[int, RequestOutput]]:
        """Yield outputs until every request of the batch has finished; stop early when cancelled.
        Raises the InvalidRequest or EngineDead the loop reported for this batch."""
        unfinished = set(range(len(self.request_ids)))
        while unfinished:
            item = self._get()
            if item is _CANCELLED:
                return
            if isinstance(item, BaseException):
                raise item
            index, out = item
            if out.finished:
                unfinished.discard(index)
                self.finished = not unfinished
            yield index, out


class EngineLoop:
    """Owns an LLMEngine on a background thread; every public method is thread-safe."""

    def __init__(self, engine, on_death: Callable[[BaseException], None] | None = None, gate=None, observer=None,
                 on_start: Callable[[], None] | None = None):
        self.engine = engine
        self._on_start = on_start
        self.observer = observer
        self.error: BaseException | None = None
        self._on_death = on_death
        self._gate = gate
        self._held: list[tuple] = []      # "add" commands waiting for the gate
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._stopping = False
        self._streams: dict[str, tuple[RequestStream, int]] = {}   # engine request id -> (stream, index)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.error is None

    def submit(self, stream: RequestStream, prompts: Sequence[str | list[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> None:
        """Queue one batch (prompt i becomes engine request `stream.request_ids[i]`, sampled with `params`
        or `params[i]`). The batch is added all or nothing; an engine-side InvalidRequest arrives through
        the stream."""
        self._command(("add", stream, list(prompts), params if isinstance(params, SamplingParams) else list(params)))

    def abort(self, request_ids: Sequence[str], owner: RequestStream | None = None) -> None:
        """Abort requests that are still running; unknown or finished ids are ignored. With `owner`, only
        requests submitted by that stream: a late cancel of a finished call never hits a newer call that
        reuses its ids."""
        self._command(("abort", list(request_ids), owner))

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run `fn(engine)` on the engine thread between two steps and return its result."""
        future: Future = Future()
        self._command(("call", fn, future))
        return future.result(timeout)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort whatever is still running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _command(self, command: tuple) -> None:
        with self._cond:
            if self._stopping or self.error is not None or not self._thread.is_alive():
                raise EngineDead(self._death_message())
            self._commands.append(command)
            self._cond.notify()

    def _death_message(self) -> str:
        if self.error is not None:
            return f"engine thread crashed: {type(self.error).__name__}: {self.error}"
        return "engine is shutting down" if self._stopping else "engine thread is not running"

    # ---------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        busy = False
        try:
            if self._on_start is not None:
                self._on_start()
            while True:
                with self._cond:
                    while not self._commands and not busy and not self._stopping:
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                for command in commands:
                    self._apply(command)
                if stopping:
                    break
                if self.engine.has_unfinished_requests():
                    started = time.monotonic()
                    outputs = self.engine.step()
                    if self.observer is not None:
                        self.observer.on_step(self.engine, outputs, started)
                    self._dispatch(outputs)
                self._pass_gate()
                busy = self.engine.has_unfinished_requests()
        except BaseException as err:  # noqa: BLE001 - any crash must reach every waiting client
            log.exception("engine thread crashed")
            with self._cond:
                self.error = err
        finally:
            self._shut_down()

    def _pass_gate(self) -> None:
        if self._gate is None:
            return
        overdue = getattr(self._gate, "overdue", None)
        message = overdue() if overdue is not None and self.engine.has_unfinished_requests() else None
        if message is not None:
            self._dispatch(self.engine.abort_all(message))
        if self._gate.before_step(self.engine) or (self._held and not self._gate.holding):
            held, self._held = self._held, []
            for command in held:
                self._add(*command[1:])

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            if self._gate is not None and (self._gate.holding or self._held):
                self._held.append(command)     # also behind batches held for a swap just applied: FCFS
            else:
                self._add(*command[1:])
        elif kind == "abort":
            owner = command[2] if len(command) > 2 else None
            for request_id in command[1]:
                entry = self._streams.get(request_id)
                if entry is not None and (owner is None or entry[0] is owner):
                    del self._streams[request_id]
                    self.engine.abort_request(request_id)
                    if self.observer is not None:
                        self.observer.on_aborted(request_id)
        elif kind == "call":
            fn, future = command[1], command[2]
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as err:  # noqa: BLE001 - the caller gets it
                    future.set_exception(err)

    def _add(self, stream: RequestStream, prompts: list, params) -> None:
        if stream.cancelled:
            return
        added: list[str] = []
        for index, (request_id, prompt) in enumerate(zip(stream.request_ids, prompts)):
            try:
                if request_id in self._streams:
                    raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
                self.engine.add_request(request_id, prompt, params[index] if isinstance(params, list) else params)
            except InvalidRequest as err:
                for done in added:       # nothing has stepped since: as if never added
                    self._streams.pop(done, None)
                    self.engine.abort_request(done)
                stream.put(PromptRefused(index, err))
                return
            added.append(request_id)
            self._streams[request_id] = (stream, index)
        if self.observer is not None:
            for request_id in added:
                self.observer.on_added(request_id, stream.arrival)
        stream._loop = self
        if stream.cancelled:             # cancelled while being added: abort() may have missed it
            self._apply(("abort", added, stream))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:            # aborted meanwhile
                continue
            stream, index = entry
            if out.finished:
                del self._streams[out.request_id]
            stream.put((index, out))

    def _shut_down(self) -> None:
        with self._cond:
            self._stopping = True
            commands, self._commands = self._held + self._commands, []
            self._held = []
        error = EngineDead(self._death_message())
        if self._gate is not None and hasattr(self._gate, "fail_pending"):
            self._gate.fail_pending(error)
        for command in commands:
            if command[0] == "add":
                command[1].put(error)
            elif command[0] == "call":
                command[2].set_exception(error)
        for stream, _ in list(self._streams.values()):
            stream.put(error)
        if self.error is None:
            for request_id in list(self._streams):
                try:
                    self.engine.abort_request(request_id)
                except Exception:  # noqa: BLE001 - best effort while stopping
                    log.exception("abort of %s failed during shutdown", request_id)
        self._streams.clear()
        if self.error is not None and self._on_death is not None:
            self._on_death(self.error)
