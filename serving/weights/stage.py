"""Staging a weight push: assemble the streamed tensors, check each one, verify the commit's checksum.

A push is `header → tensor chunks (each tensor's chunks in order) → commit{checksum}`. The stage checks
every tensor against the served model as soon as its first chunk names it (full weights: a known HF
parameter name with the same shape; LoRA: adapters `<module>.lora_A/B[.<adapter>].weight` of a known
linear weight with consistent ranks), decodes it, and folds it into the checksum. Nothing here touches
the served weights: the result is a `StagedUpdate` that serving.weights.swap applies between two steps.
Every error is an InvalidRequest naming the header field or the tensor.

A full push may carry a subset of the parameters (the others keep their values); whatever it carries
is swapped in together or not at all. A tied matrix may be sent under either of its names.

Bounded and clean by construction: every tensor must be a known parameter (or an adapter of one, its
rank at most the matrix's smaller side) and each name comes once, and the elements staged in one push
may not exceed twice the served model's (a LoRA pair of full rank); a quantization block may not exceed
MAX_QUANT_BLOCK elements; values must be finite; versions must increase and stay below MAX_VERSION.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from common.errors import InvalidRequest
from protos import tandem_pb2
from protos.codec import Checksum, CodecError, TensorAssembler

_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_NOT_LORA_TARGETS = ("embed", "wte", "wpe", "lm_head")
MAX_QUANT_BLOCK = 1 << 16         # elements per int8/int4 block (the sender's default is 256)
MAX_VERSION = (1 << 62) - 1       # weight versions are int64 on the wire; leave room to count on


def lora_parts(name: str) -> tuple[str, str] | None:
    """(target weight name, "A" or "B") for a LoRA adapter tensor name in peft or tandem form."""
    match = _LORA_NAME.match(name)
    if match is None:
        return None
    return match["module"] + ".weight", match["which"]


@dataclass
class LoraAdapter:
    """One target matrix's adapter pair: delta = scale * B @ A (transposed for GPT-2's Conv1D [in, out])."""

    a: torch.Tensor | None = None   # [r, in]
    b: torch.Tensor | None = None   # [out, r]

    def delta(self, scale: float, conv1d: bool) -> torch.Tensor:
        d = scale * (self.b @ self.a)
        return d.t() if conv1d else d


@dataclass
class StagedUpdate:
    """A complete, verified push, ready to swap in (float32 values, on the CPU)."""

    version: int
    origin: str
    lora: bool
    lora_scale: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)     # full: HF name -> values
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)     # LoRA: target weight name -> A, B
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)      # LoRA: target -> scale * B @ A (staged)
    num_tensors: int = 0
    bytes_received: int = 0
    checksum: str = ""
    stage_s: float = 0.0


class WeightStage:
    """Receives one push stream message by message (`feed`), then hands back the update (`result`)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], current_version: int, conv1d: bool = False,
                 max_origin_chars: int = 256):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.max_origin_chars = max_origin_chars
        self.max_staged = 2 * sum(math.prod(s) for s in self.shapes.values())   # elements one push may stage
        self.staged = 0
        self.current_version = current_version
        self.conv1d = conv1d            # GPT-2: 2-D weights are Conv1D [in, out]
        self.update: StagedUpdate | None = None
        self.committed = False
        self.declared = 0               # tensors the header announced (0: not declared)
        self._assembler: TensorAssembler | None = None
        self._names: set[str] = set()
        self._checksum = Checksum()
        self._started = time.perf_counter()

    # ---------------------------------------------------------------- the stream

    def feed(self, message: tandem_pb2.WeightChunk) -> None:
        kind = message.WhichOneof("kind")
        if self.committed:
            raise InvalidRequest("commit", "the commit must be the last message of a push")
        if kind == "header":
            self._header(message.header)
        elif self.update is None:
            raise InvalidRequest("header", f"a push must start with a header, got {kind or 'an empty message'}")
        elif kind == "tensor":
            self._tensor(message.tensor)
        elif kind == "commit":
            self._commit(message.commit)
        else:
            raise InvalidRequest("kind", "empty WeightChunk: set header, tensor or commit")
        self.update.bytes_received += message.ByteSize()

    def result(self) -> StagedUpdate:
        """The verified update; raises InvalidRequest when the stream ended before a valid commit."""
        if self.update is None:
            raise InvalidRequest("header", "the push ended before its header; nothing applied")
        if not self.committed:
            raise InvalidRequest("commit", f"the push ended after {len(self._names)} tensors without a commit; "
                                           f"nothing applied")
        return self.update

    # ---------------------------------------------------------------- messages

    def _header(self, header: tandem_pb2.WeightHeader) -> None:
        if self.update is not None:
            raise InvalidRequest("header", "a push has exactly one header, at the start")
        if header.version <= self.current_version:
            raise InvalidRequest("header.version", f"must be greater than the version in force "
                                                   f"({self.current_version}), got {header.version}")
        if header.version > MAX_VERSION:
            raise InvalidRequest("header.version", f"must be <= {MAX_VERSION}, got {header.version}")
        if len(header.origin) > self.max_origin_chars:
            raise InvalidRequest("header.origin", f"{len(header.origin)} characters exceed the limit "
                                                  f"max_id_chars={self.max_origin_chars}")
        if header.num_tensors < 0:
            raise InvalidRequest("header.num_tensors", f"must be >= 0 (0: not declared), got {header.num_tensors}")
        if header.lora and (not math.isfinite(header.lora_scale) or header.lora_scale == 0):
            raise InvalidRequest("header.lora_scale", f"a LoRA push needs a finite, non-zero scale (alpha / r), "
                                                      f"got {header.lora_scale}")
        self.declared = header.num_tensors
        self.update = StagedUpdate(version=header.version, origin=header.origin, lora=header.lora,
                                   lora_scale=header.lora_scale if header.lora else 0.0)

    def _tensor(self, chunk: tandem_pb2.TensorChunk) -> None:
        if self._assembler is None or self._assembler.done:
            self._assembler = self._start(chunk)
        elif chunk.name != self._assembler.name:
            raise InvalidRequest(self._assembler.name, f"incomplete ({self._assembler.filled}/"
                                                       f"{self._assembler.numel} elements) when a chunk of "
                                                       f"{chunk.name!r} arrived; send each tensor's chunks in order")
        if chunk.dtype in ("int8", "int4") and not 2 <= chunk.block_size <= MAX_QUANT_BLOCK:
            raise InvalidRequest(f"{chunk.name}.block_size", f"must be in [2, {MAX_QUANT_BLOCK}], got {chunk.block_size}")
        try:
            done = self._assembler.add(chunk)
        except CodecError as exc:
            raise InvalidRequest(chunk.name, str(exc).removeprefix(chunk.name + ": ")) from None
        if done:
            self._store(self._assembler.name, self._assembler.tensor())

    def _start(self, chunk: tandem_pb2.TensorChunk) -> TensorAssembler:
        name, shape = chunk.name, tuple(int(n) for n in chunk.shape)
        if not name:
            raise InvalidRequest("tensor.name", "every tensor chunk needs the tensor's name")
        if name in self._names:
            raise InvalidRequest(name, "sent twice in one push")
        if any(n <= 0 for n in shape) or not shape:
            raise InvalidRequest(name, f"shape must be non-empty with positive sizes, got {shape}")
        if self.update.lora:
            self._check_adapter(name, shape)
        else:
            expected = self.shapes.get(name)
            if expected is None:
                raise InvalidRequest(name, "unknown parameter name for the served model")
            if shape != expected:
                raise InvalidRequest(name, f"shape {shape} does not match the served model's {expected}")
        if self.declared and len(self._names) >= self.declared:
            raise InvalidRequest(name, f"more tensors than the header declared ({self.declared})")
        numel = math.prod(shape)
        if self.staged + numel > self.max_staged:
            raise InvalidRequest(name, f"staging it would hold {self.staged + numel} elements, more than twice the "
                                       f"served model ({self.max_staged // 2})")
        self.staged += numel
        self._names.add(name)
        return TensorAssembler(name, shape, chunk.dtype)

    def _check_adapter(self, name: str, shape: tuple[int, ...]) -> None:
        parts = lora_parts(name)
        if parts is None:
            raise InvalidRequest(name, "a LoRA push carries only adapters named <module>.lora_A.weight or "
                                       "<module>.lora_B.weight")
        target, which = parts
        target_shape = self.shapes.get(target)
        if target_shape is None or len(target_shape) != 2 or any(s in target for s in _NOT_LORA_TARGETS):
            raise InvalidRequest(name, f"adapts {target!r}, which is not a linear weight of the served model")
        out_dim, in_dim = target_shape[::-1] if self.conv1d else target_shape
        if len(shape) != 2:
            raise InvalidRequest(name, f"an adapter must be 2-D, got shape {shape}")
        rank = shape[0] if which == "A" else shape[1]
        if which == "A" and shape[1] != in_dim or which == "B" and shape[0] != out_dim:
            want = f"[r, {in_dim}]" if which == "A" else f"[{out_dim}, r]"
            raise InvalidRequest(name, f"shape {shape} does not fit {target} {target_shape}: expected {want}")
        if rank > min(out_dim, in_dim):
            raise InvalidRequest(name, f"rank {rank} exceeds min{target_shape}")
        adapter = self.update.adapters.setdefault(target, LoraAdapter())
        if getattr(adapter, which.lower()) is not None:
            raise InvalidRequest(name, f"a second lora_{which} for {target}")
        other = adapter.b if which == "A" else adapter.a
        if other is not None:
            other_rank = other.shape[1] if which == "A" else other.shape[0]
            if other_rank != rank:
                raise InvalidRequest(name, f"rank {rank} differs from its pair's rank {other_rank}")

    def _store(self, name: str, values: torch.Tensor) -> None:
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            raise InvalidRequest(name, f"carries {int((~finite).sum())} non-finite values (NaN or inf); nothing applied")
        self._checksum.update(name, values)
        self.update.num_tensors += 1
        if self.update.lora:
            target, which = lora_parts(name)
            setattr(self.update.adapters[target], which.lower(), values)
        else:
            self.update.tensors[name] = values

    def _commit(self, commit: tandem_pb2.WeightCommit) -> None:
        if self._assembler is not None and not self._assembler.done:
            raise InvalidRequest(self._assembler.name, f"incomplete at the commit ({self._assembler.filled}/"
                                                       f"{self._assembler.numel} elements)")
        update = self.update
        if update.num_tensors == 0:
            raise InvalidRequest("commit", "a push must carry at least one tensor")
        if self.declared and update.num_tensors != self.declared:
            raise InvalidRequest("header.num_tensors", f"declared {self.declared} tensors, "
                                                       f"received {update.num_tensors}")
        for target, adapter in update.adapters.items():
            if adapter.a is None or adapter.b is None:
                raise InvalidRequest(target, f"LoRA adapter has lora_{'A' if adapter.a is None else 'B'} missing")
        digest = self._checksum.hexdigest()
        if commit.checksum != digest:
            raise InvalidRequest("commit.checksum", f"mismatch: the push says {commit.checksum[:16] or '(empty)'}…, "
                                                    f"the received tensors give {digest[:16]}…; nothing applied")
        update.checksum = digest
        update.deltas = {t: a.delta(update.lora_scale, self.conv1d) for t, a in update.adapters.items()}
        update.stage_s = time.perf_counter() - self._started
        self.committed = True
