"""RMSNorm as in Llama (statistics in float32, weight applied in the input dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.layers import fused_kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); with `residual`, (residual + x, RMSNorm(residual + x)), one pass on CPU for both."""
        fused = fused_kernels.rms_norm(x, self.weight, self.eps, residual)
        if fused is not None:
            return fused
        if residual is not None:
            x = residual + x
            return x, self._norm(x)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, bit-identical to the unfused form in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
