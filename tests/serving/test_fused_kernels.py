"""The fused CPU kernels (SiLU-and-multiply, RoPE, RMSNorm) against the PyTorch forms they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving.layers import cpu_extension, fused_kernels

pytestmark = pytest.mark.skipif(cpu_extension.load() is None,
                                reason="tandem's CPU kernels could not be built here (no compiler?)")


def _reference_rope(q, k, cos, sin):
    return q * cos + fused_kernels.rotate_half(q) * sin, k * cos + fused_kernels.rotate_half(k) * sin


def _tables(tokens: int, head_dim: int, dtype: torch.dtype):
    angles = torch.rand(tokens, 1, head_dim // 2) * 40
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (8, 4, 16), (4, 4, 6)])
def test_rope_in_place_on_views_of_the_qkv_product(dtype, heads, kv_heads, head_dim):
    torch.manual_seed(0)
    tokens = 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos, sin = _tables(tokens, head_dim, dtype)
    want_q, want_k = _reference_rope(q.clone(), k.clone(), cos, sin)
    got_q, got_k = fused_kernels.rope(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()                          # rotated where it lies
    if dtype == torch.float32:                                        # no fused multiply-add: the same bits
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    else:                                                             # one rounding instead of three
        torch.testing.assert_close(got_q.float(), want_q.float(), atol=0.1, rtol=2e-2)
        torch.testing.assert_close(got_k.float(), want_k.float(), atol=0.1, rtol=2e-2)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)   # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1408, 384, 37])
def test_silu_mul_matches_silu_times_up(dtype, width):
    torch.manual_seed(0)
    gate_up = torch.randn(19, 2 * width, dtype=dtype) * 6
    gate, up = gate_up.split([width, width], dim=-1)                  # views of one packed product
    want = F.silu(gate.float()) * up.float()
    got = fused_kernels.silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == (19, width) and got.is_contiguous()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want, **tol)


def test_silu_mul_extremes_stay_finite():
    gate = torch.tensor([[-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4] + [0.5] * 9])
    got = fused_kernels.silu_mul(gate, torch.ones_like(gate))
    torch.testing.assert_close(got, F.silu(gate), atol=1e-6, rtol=1e-6)


def test_disabled_kernels_give_the_pytorch_forms(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos, sin = _tables(5, 32, torch.float32)
    monkeypatch.setattr(fused_kernels, "ENABLED", False)
    got_q, got_k = fused_kernels.rope(q, k, cos, sin)
    assert got_q.data_ptr() != q.data_ptr()                           # the out-of-place PyTorch form ran
    want_q, want_k = _reference_rope(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [128, 37])
def test_rms_norm_with_and_without_the_residual_add_matches_the_pytorch_form(dtype, width, monkeypatch):
    from serving.layers.norms import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width) * 2)
    packed = torch.randn(23, 3 * width, dtype=dtype) * 4
    x = packed[:, width:2 * width]                                     # a strided view, as a sublayer's output may be
    residual = torch.randn(23, width, dtype=dtype)
    monkeypatch.setattr(fused_kernels, "ENABLED", False)              # the PyTorch form, as the reference
    want = norm(x)
    want_sum, want_normed = norm(x, residual=residual)
    monkeypatch.undo()
    got = norm(x)
    got_sum, got_normed = norm(x, residual=residual)
    assert fused_kernels.rms_norm(x, norm.weight, norm.eps) is not None   # the kernel served it
    assert torch.equal(got_sum, want_sum)                                 # one rounded add, as torch's
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got_normed.float(), want_normed.float(), **tol)
    assert got.dtype == dtype and got_normed.shape == (23, width)
