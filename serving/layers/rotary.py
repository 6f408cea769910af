"""Rotary position embedding (the "rotate half" layout used by HF Llama) over a precomputed cos/sin table."""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError
from serving.layers import fused_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear")


def rope_settings(hf_config) -> tuple[float, str, float]:
    """(theta, rope_type, linear factor) from a HF config, old (`rope_theta`) or new (`rope_parameters`) style."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError("model", f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return theta, rope_type, factor


class RotaryEmbedding(nn.Module):
    """RoPE for q [T, H, D] and k [T, Hkv, D]: `apply(q, k, lookup(positions))`."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, linear_factor: float = 1.0):
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.linear_factor = theta, linear_factor
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """(Re)compute the cos/sin table; called once the model is on its device."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent) / self.linear_factor
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] at the given positions: looked up once per pass, shared by all layers."""
        return (self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1))

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
        """q * cos + rotate_half(q) * sin, and the same for k (in place on CPU: serving/layers/fused_kernels.py)."""
        return fused_kernels.rope(q, k, *cos_sin)
