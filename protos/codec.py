"""Wire codecs for weight updates: tensors as chunks (fp32, bf16, or quantized by protos.quantize), checksums.

The checksum is taken over the *decoded*
float32 values, so sender and receiver can both compute it and a corrupted or mis-assembled update is
caught before it is applied.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from protos import tandem_pb2
from protos.quantize import QMAX, QuantizationError, dequantize_blockwise, quantize_blockwise

ENCODINGS = ("float32", "bfloat16", "int8", "int4")
DEFAULT_CHUNK_BYTES = 1 << 20


class CodecError(QuantizationError):
    """A tensor chunk that cannot be decoded; the message names the tensor."""


def _raw_bytes(flat: torch.Tensor, encoding: str) -> bytes:
    if encoding == "float32":
        return flat.to(torch.float32).numpy().astype("<f4").tobytes()
    return flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


def _raw_values(data: bytes, encoding: str) -> torch.Tensor:
    if encoding == "float32":
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
    halves = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))
    return halves.view(torch.bfloat16).to(torch.float32)


def encode_tensor(name: str, tensor: torch.Tensor, encoding: str = "float32", block_size: int = 256,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tandem_pb2.TensorChunk]:
    """Yield the TensorChunks of one tensor. Quantized chunks hold whole blocks."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    flat = tensor.detach().to("cpu").reshape(-1)
    numel = flat.numel()
    bytes_per_elem = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}[encoding]
    step = max(1, int(chunk_bytes / bytes_per_elem))
    if encoding in QMAX:
        step = max(block_size, step // block_size * block_size)
    offset = 0
    while True:
        part = flat[offset:offset + step]
        chunk = tandem_pb2.TensorChunk(name=name, shape=list(tensor.shape), dtype=encoding, offset=offset,
                                       last=offset + part.numel() >= numel)
        if encoding in QMAX:
            chunk.block_size = block_size
            chunk.data, chunk.scales = quantize_blockwise(part, 8 if encoding == "int8" else 4, block_size)
        else:
            chunk.data = _raw_bytes(part, encoding)
        yield chunk
        offset += part.numel()
        if offset >= numel:
            return


def decode_chunk(chunk: tandem_pb2.TensorChunk, numel: int) -> torch.Tensor:
    """Float32 values carried by one chunk (`numel` elements expected)."""
    if chunk.dtype not in ENCODINGS:
        raise CodecError(f"{chunk.name}: unknown dtype {chunk.dtype!r}, expected one of {ENCODINGS}")
    if chunk.dtype in QMAX:
        if chunk.block_size < 2 or chunk.block_size % 2:
            raise CodecError(f"{chunk.name}: bad block_size {chunk.block_size}")
        return dequantize_blockwise(chunk.data, chunk.scales, 8 if chunk.dtype == "int8" else 4,
                                    chunk.block_size, numel)
    width = 4 if chunk.dtype == "float32" else 2
    if len(chunk.data) != numel * width:
        raise CodecError(f"{chunk.name}: chunk at offset {chunk.offset} has {len(chunk.data)} bytes, "
                         f"expected {numel * width}")
    return _raw_values(chunk.data, chunk.dtype)


def chunk_numel(chunk: tandem_pb2.TensorChunk) -> int:
    """Elements in a chunk, from its byte length."""
    if chunk.dtype == "float32":
        return len(chunk.data) // 4
    if chunk.dtype == "bfloat16":
        return len(chunk.data) // 2
    if chunk.dtype == "int8":
        return len(chunk.data)
    total = math.prod(chunk.shape)
    return min(2 * len(chunk.data), total - chunk.offset)


@dataclass
class TensorAssembler:
    """Collects the chunks of one tensor in order and checks they tile it exactly."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        self.numel = math.prod(self.shape)
        self.values = torch.empty(self.numel, dtype=torch.float32)
        self.filled = 0
        self.done = False

    def add(self, chunk: tandem_pb2.TensorChunk) -> bool:
        """Add the next chunk; returns True when the tensor is complete."""
        if self.done:
            raise CodecError(f"{self.name}: chunk after the last one")
        if tuple(chunk.shape) != self.shape or chunk.dtype != self.dtype:
            raise CodecError(f"{self.name}: shape/dtype changed between chunks")
        if chunk.offset != self.filled:
            raise CodecError(f"{self.name}: chunk offset {chunk.offset}, expected {self.filled}")
        n = chunk_numel(chunk)
        if n <= 0 or self.filled + n > self.numel:
            raise CodecError(f"{self.name}: chunk of {n} elements overruns the tensor of {self.numel}")
        self.values[self.filled:self.filled + n] = decode_chunk(chunk, n)
        self.filled += n
        if chunk.last:
            if self.filled != self.numel:
                raise CodecError(f"{self.name}: last chunk leaves {self.numel - self.filled} elements missing")
            self.done = True
        return self.done

    def tensor(self) -> torch.Tensor:
        if not self.done:
            raise CodecError(f"{self.name}: incomplete ({self.filled}/{self.numel} elements)")
        return self.values.view(self.shape)


def roundtrip(tensor: torch.Tensor, encoding: str, block_size: int = 256) -> torch.Tensor:
    """What the receiver will decode for `tensor` (float32), as the sender computes it for the checksum."""
    assembler = TensorAssembler("t", tuple(tensor.shape), encoding)
    for chunk in encode_tensor("t", tensor, encoding, block_size):
        assembler.add(chunk)
    return assembler.tensor()


class Checksum:
    """sha256 over (name, shape, float32 little-endian values) of every tensor, in push order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, values: torch.Tensor) -> None:
        self._h.update(name.encode() + b"\0" + repr(tuple(values.shape)).encode() + b"\0")
        self._h.update(values.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = Checksum()
    for name, values in named:
        digest.update(name, values)
    return digest.hexdigest()
