"""The communication group of one tensor-parallel model: its own store and backend.

The group is a torch.distributed backend object (ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA)
built over its own TCPStore on 127.0.0.1, not the process's default group: a serving process can hold
a TP group next to whatever else uses torch.distributed (a learner, DeepSpeed, another TP engine in a
benchmark or test), and tearing it down touches nothing else. Every operation is synchronous and runs
under the group's timeout, so a dead peer turns into a RuntimeError instead of a hang.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist


class TPGroup:
    def __init__(self, rank: int, world: int, port: int, device: torch.device, timeout_s: float):
        self.rank, self.world = rank, world
        self.device = device                       # where collective buffers live (cpu, or cuda:rank)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.backend = dist.ProcessGroupNCCL(self.store, rank, world, options)
            self.name = "nccl"
        else:
            self.backend = dist.ProcessGroupGloo(self.store, rank, world, timeout)
            self.name = "gloo"

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        self.backend.allreduce([tensor]).wait()

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = root
        self.backend.broadcast([tensor], options).wait()

    def broadcast_object(self, obj=None):
        """Rank 0's picklable `obj` on every rank (the others pass nothing)."""
        if self.rank == 0:
            payload = _to_bytes(obj, self.device)
            size = torch.tensor([payload.numel()], dtype=torch.long, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.long, device=self.device)
        self.broadcast(size)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(payload)
        return obj if self.rank == 0 else _from_bytes(payload)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all ranks), index = rank."""
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.backend.allgather([out], [tensor.contiguous()]).wait()
        return out

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, index = rank."""
        payload = _to_bytes(obj, self.device)
        sizes = self.all_gather(torch.tensor([payload.numel()], dtype=torch.long, device=self.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:payload.numel()] = payload
        return [_from_bytes(p[:int(s.item())]) for p, s in zip(self.all_gather(padded), sizes)]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.backend.send([tensor.contiguous()], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.backend.recv([tensor], src, 0).wait()


def _to_bytes(obj, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _from_bytes(payload: torch.Tensor):
    return pickle.loads(payload.cpu().numpy().tobytes())
