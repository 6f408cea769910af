"""Blockwise symmetric INT8/INT4 quantization, as in ZeRO++ qwZ.

A tensor is flattened and cut into blocks of `block_size` elements; each block has its own float32 scale
(absmax / qmax) and symmetric integer codes. INT8 is one byte an element (half of fp16), INT4 two codes a
byte (a quarter).
"""

from __future__ import annotations

import math

import numpy as np
import torch

QMAX = {"int8": 127, "int4": 7}


class QuantizationError(ValueError):
    """Codes or scales that do not match the tensor they claim to encode."""


def quantize_blockwise(flat: torch.Tensor, bits: int, block_size: int) -> tuple[bytes, bytes]:
    """Symmetric per-block quantization of a 1-D float tensor; returns (codes, float32 scales)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    qmax = 127 if bits == 8 else 7
    x = flat.detach().to(torch.float32).reshape(-1)
    n = x.numel()
    padded = math.ceil(n / block_size) * block_size
    if padded != n:
        x = torch.nn.functional.pad(x, (0, padded - n))
    blocks = x.view(-1, block_size)
    scales = blocks.abs().amax(dim=1) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / scales[:, None]).clamp_(-qmax, qmax).to(torch.int8).reshape(-1)[:n]
    if bits == 8:
        data = codes.numpy().tobytes()
    else:
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
        if n % 2:
            nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
        pairs = nibbles.view(-1, 2)
        data = (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()
    return data, scales.numpy().astype("<f4").tobytes()


def dequantize_blockwise(data: bytes, scales: bytes, bits: int, block_size: int, numel: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 values of `numel` elements."""
    if bits == 8:
        codes = np.frombuffer(data, dtype=np.int8).astype(np.float32)
    else:
        packed = np.frombuffer(data, dtype=np.uint8)
        codes = np.empty(packed.size * 2, dtype=np.float32)
        codes[0::2] = (packed & 0x0F).astype(np.float32) - 8
        codes[1::2] = (packed >> 4).astype(np.float32) - 8
    codes = codes[:numel]
    if codes.size != numel:
        raise QuantizationError(f"expected {numel} codes, got {codes.size}")
    s = np.frombuffer(scales, dtype="<f4")
    if s.size != math.ceil(numel / block_size):
        raise QuantizationError(f"expected {math.ceil(numel / block_size)} scales, got {s.size}")
    values = codes * np.repeat(s, block_size)[:numel]
    return torch.from_numpy(values)
