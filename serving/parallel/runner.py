"""Rank 0 of a tensor-parallel group: the ModelRunner the engine is given (`LLMEngine(config, runner=...)`).

It spawns ranks 1..N-1 (serving.parallel.worker.worker_main), loads its own shard, and forwards every
`allocate_kv_cache`, `run` and `load_weights` to the group before doing its own part.

Rank failure: collectives run under a timeout (`collective_timeout_s`); a watchdog thread checks the
worker processes twice a second and pings idle workers every few seconds (so an idle server notices a
dead or stuck rank too, and idle workers never reach the timeout). On failure it calls
`on_failure(message)` once, and every later call raises RankFailure at once instead of entering a
collective that would hang.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp

from common.errors import ConfigError, FieldError
from common.net import free_port
from serving.batch import ScheduledChunk
from serving.engine.config import EngineConfig
from serving.parallel.group import TPGroup
from serving.parallel.tp import check_tensor_parallel, layout_of, shard_for_rank, unshard
from serving.parallel.worker import ShardedModelRunner, rank_device, rank_memory, threads_per_rank, worker_main

logger = logging.getLogger(__name__)

WATCH_S = 0.5     # how often the worker processes are checked
PING_S = 5.0      # an idle group is pinged this often (well under the collective timeout)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or a collective failed: the group cannot serve any more."""


class TPModelRunner(ShardedModelRunner):
    """Rank 0's runner: the ModelRunner interface the engine uses, driving N-1 worker processes.

    `run`, `allocate_kv_cache` and `load_weights` (full HF tensors in, each rank sent only its slice,
    all-or-nothing: every tensor is checked on rank 0 before anything is sent) involve every rank."""

    def __init__(self, config: EngineConfig, tp: int, collective_timeout_s: float = 60.0,
                 on_failure: Callable[[str], None] | None = None):
        from serving.models import read_hf_config

        config.validate()
        check_tensor_parallel(read_hf_config(config.model), tp)   # refused before any process starts
        device, _ = rank_device(config, 0)
        if device.type == "cuda" and torch.cuda.device_count() < tp:
            raise ConfigError("tp", f"tp={tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")
        self.on_failure = on_failure
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._last_command = time.monotonic()
        self._closed = False
        self._threads = torch.get_num_threads()
        port = free_port()
        ctx = mp.get_context("spawn")
        self.workers = [ctx.Process(target=worker_main, args=(r, tp, config, port, collective_timeout_s),
                                    name=f"tp-rank{r}", daemon=True) for r in range(1, tp)]
        for proc in self.workers:
            proc.start()
        if device.type == "cpu":
            torch.set_num_threads(threads_per_rank(tp))
        error = None
        try:
            group = TPGroup(0, tp, port, device, collective_timeout_s)
            try:
                super().__init__(config, group)
            except Exception as exc:  # noqa: BLE001 - tell the workers, then raise
                error = exc
            errors = group.all_gather_object(None if error is None else str(error))
        except BaseException:
            self._teardown(join=False)
            raise
        if error is not None or any(errors):
            self._teardown(join=True)
            if error is not None:
                raise error
            raise ConfigError("tp", next(e for e in errors if e))
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        logger.info("tensor parallel: %d ranks (%s), pids %s", tp, group.name,
                    [os.getpid()] + [p.pid for p in self.workers])

    # ------------------------------------------------------------ the ModelRunner interface

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        with self._group_call(("alloc", num_blocks, block_size)):
            super().allocate_kv_cache(num_blocks, block_size)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        if not chunks:
            return super().run(chunks)
        with self._group_call(("run", chunks)):
            return super().run(chunks)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full HF tensors in; rank r receives and keeps only `shard_for_rank(name, t, r, N)`."""
        full = [(name, t) for name, t in named_tensors if self.model.hf_name(name) is not None]
        shapes = self.hf_parameter_shapes()
        for name, t in full:              # full shapes first, so errors name what the caller sent
            expected = shapes.get(self.model.hf_name(name))
            if expected is not None and isinstance(t, torch.Tensor) and tuple(t.shape) != expected:
                raise FieldError(name, f"shape {tuple(t.shape)} does not match {expected}")
        plan = self.model.tp_plan
        local = [(name, shard_for_rank(plan, self.model.hf_name(name), t, 0, self.world) if isinstance(t, torch.Tensor) else t)
                 for name, t in full]
        pairs = self.model.check_weights(local)          # FieldError naming the tensor: nothing sent
        table = self.model.parameter_table()
        names = [self.model.hf_name(name) for name, _ in full]
        with self._group_call(("load", names)):
            for rank in range(1, self.world):
                for name, (_, tensor) in zip(names, full):
                    part = shard_for_rank(plan, name, tensor, rank, self.world).to(table[name].device, table[name].dtype)
                    self.group.send(part, dst=rank)
            self.model.write_weights(pairs)

    def full_parameter(self, name: str) -> torch.Tensor:
        """The full value of HF parameter `name`, gathered from every rank's shard (e.g. a LoRA base)."""
        hf_name = self.model.hf_name(name)
        local = self.model.parameter_table().get(hf_name) if hf_name is not None else None
        if local is None:
            raise FieldError(name, f"unknown parameter for {type(self.model).__name__}")
        if layout_of(self.model.tp_plan, hf_name) is None:
            return local.detach().clone()
        with self._group_call(("gather", hf_name)):
            shards = self.group.all_gather(local)
        return unshard(self.model.tp_plan, hf_name, shards)

    def rank_memory(self) -> list[dict[str, int]]:
        """Per rank (index = rank): bytes of sharded parameters, replicated parameters and KV cache."""
        with self._group_call(("memory",)):
            return self.group.all_gather_object(rank_memory(self))

    # ------------------------------------------------------------ group plumbing

    @contextmanager
    def _group_call(self, command: tuple):
        """Send `command` to every worker, then run rank 0's part; a failed collective fails the group."""
        with self._lock:
            if self.failure is not None or self._closed:
                raise RankFailure(self.failure or "the tensor-parallel group was shut down")
            try:
                self.group.broadcast_object(command)
                yield
            except RuntimeError as exc:
                if not isinstance(exc, RankFailure):
                    self._fail(f"{command[0]!r} on the TP group failed: {exc}")
                    raise RankFailure(self.failure or str(exc)) from exc
                raise
            finally:
                self._last_command = time.monotonic()

    def _fail(self, message: str) -> None:
        if self.failure is not None or self._closed:
            return
        self.failure = message
        logger.error("tensor-parallel group failed: %s", message)
        if self.on_failure is not None:
            self.on_failure(message)

    def _watch(self) -> None:
        """Check the worker processes every WATCH_S; ping the group when it has been idle for PING_S."""
        while not self._closed and self.failure is None:
            time.sleep(WATCH_S)
            dead = [(rank, p) for rank, p in enumerate(self.workers, start=1) if not p.is_alive()]
            if dead and not self._closed:
                rank, proc = dead[0]
                self._fail(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
                return
            if time.monotonic() - self._last_command < PING_S or not self._lock.acquire(blocking=False):
                continue
            error = None
            try:
                if not self._closed and self.failure is None:
                    self.group.broadcast_object(("ping",))
            except RuntimeError as exc:
                error = exc
            finally:
                self._last_command = time.monotonic()
                self._lock.release()
            if error is not None:
                self._fail(f"ping of the TP ranks failed: {error}")
                return

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers cleanly (a ("stop",) message), or kill them after `timeout_s`."""
        if self._closed:
            return
        healthy = self.failure is None
        if healthy and self._lock.acquire(timeout=timeout_s):
            try:
                self.group.broadcast_object(("stop",))
            except Exception:  # noqa: BLE001 - best effort
                healthy = False
            finally:
                self._lock.release()
        self._closed = True
        self._teardown(join=healthy, timeout_s=timeout_s)

    def _teardown(self, join: bool, timeout_s: float = 10.0) -> None:
        self._closed = True
        for proc in self.workers:
            if join:
                proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout_s)
        torch.set_num_threads(self._threads)
