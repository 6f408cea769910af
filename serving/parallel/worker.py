"""How tensor-parallel ranks run: rank 0 schedules, every rank runs the same forward on its shard.

Launch: rank 0 is the serving process itself (`tandem serve --tp N`: it runs the engine, the scheduler
and the gRPC server, see serving.parallel.runner.TPModelRunner); it starts ranks 1..N-1 with
`torch.multiprocessing` (spawn context, daemon processes) running `worker_main`, and all ranks join one
serving.parallel.group.TPGroup: gloo on CPU, NCCL on CUDA (rank r on cuda:r), rendezvous over a TCPStore on
127.0.0.1 — no launcher (deepspeed/torchrun) is needed, and the process's default torch.distributed
group is left alone.

Protocol (rank 0 -> workers, `broadcast_object`): ("alloc", num_blocks, block_size); ("run", chunks) —
the scheduler's list of ScheduledChunk for the step, after which every rank runs the same forward and
meets the others in the two all_reduces per layer; ("load", names) followed by one point-to-point
`send` per tensor of the receiving rank's slice only; ("gather", name) (an all_gather of one
parameter's shards, e.g. a LoRA base); ("memory",); ("ping",); ("stop",), which ends the worker cleanly
(exit code 0). A worker whose rank 0 is gone fails its next collective and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch

from serving.engine.config import EngineConfig
from serving.engine.model_runner import ModelRunner, _load_tokenizer, _model_info, resolve_device_dtype
from serving.parallel.group import TPGroup
from serving.parallel.tp import full_shape, load_sharded_model, sharded_parameter_bytes

logger = logging.getLogger(__name__)


def rank_device(config: EngineConfig, rank: int) -> tuple[torch.device, torch.dtype]:
    device, dtype = resolve_device_dtype(config)
    return (torch.device("cuda", rank) if device.type == "cuda" else device), dtype


class ShardedModelRunner(ModelRunner):
    """ModelRunner over one rank's shard: its slice of the weights, a KV cache of its local KV heads."""

    def __init__(self, config: EngineConfig, group: TPGroup):
        config.validate()
        self.config, self.group, self.rank, self.world = config, group, group.rank, group.world
        device, dtype = rank_device(config, group.rank)
        self.model, self.hf_config = load_sharded_model(config.model, dtype, device, self.rank, self.world, group)
        info = _model_info(self.hf_config, self.model, config, device, dtype)
        self.info = dataclasses.replace(info, num_kv_heads=info.num_kv_heads // self.world)
        self.info.tensor_parallel = self.world   # GetStatus reports it
        self.tokenizer = _load_tokenizer(config) if self.rank == 0 else None
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0

    def hf_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full HF shapes (what a weight push must send), not this rank's shard shapes."""
        plan = self.model.tp_plan
        return {name: full_shape(plan, name, tuple(p.shape), self.world) for name, p in self.model.parameter_table().items()}


def rank_memory(runner: ShardedModelRunner) -> dict[str, int]:
    """Bytes this rank holds: sharded parameters, replicated ones, and its KV cache."""
    sharded, replicated = sharded_parameter_bytes(runner.model)
    kv = sum(c.numel() * c.element_size() for c in runner.kv_caches)
    return {"sharded_params": sharded, "replicated_params": replicated, "kv_cache": kv}


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def worker_main(rank: int, world: int, config: EngineConfig, port: int, timeout_s: float) -> None:
    """Entry point of ranks 1..N-1: load the shard, then follow rank 0's commands until ("stop",)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    device, _ = rank_device(config, rank)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(world))
    group = TPGroup(rank, world, port, device, timeout_s)
    try:
        runner, error = ShardedModelRunner(config, group), None
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which refuses to start
        runner, error = None, f"rank {rank}: {type(exc).__name__}: {exc}"
    group.all_gather_object(error)
    if runner is None:
        return
    while True:
        command = group.broadcast_object()
        kind = command[0]
        if kind == "run":
            runner.run(command[1])
        elif kind == "alloc":
            runner.allocate_kv_cache(command[1], command[2])
        elif kind == "load":
            table = runner.model.parameter_table()
            received = []
            for name in command[1]:
                buffer = torch.empty_like(table[name])
                group.recv(buffer, src=0)
                received.append((table[name], buffer))
            runner.model.write_weights(received)
        elif kind == "gather":
            group.all_gather(runner.model.parameter_table()[command[1]])
        elif kind == "memory":
            group.all_gather_object(rank_memory(runner))
        elif kind == "stop":
            break
    _leave()


def _leave() -> None:
    """Exit this rank at once, without running C++ static destructors: tearing down a live gloo group at
    interpreter exit can std::terminate (SIGABRT, exit code -6) at random. Nothing of this rank outlives
    the process anyway."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
