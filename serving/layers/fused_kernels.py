"""Elementwise steps of a Llama layer in one pass each, on CPU: SiLU-and-multiply, RoPE and RMSNorm.

In PyTorch, `silu(gate) * up` is two passes over the MLP's widest activation and a temporary, and the
"rotate half" RoPE is eight (two products, a negation, a concatenation and a sum, for q and for k); on
CPU these memory-bound passes cost a tenth of a decode step. Here each is one C++ loop over the data
(serving/layers/cpu_extension.py builds it):

- `silu_mul(gate, up)`: silu(gate) * up into a new [M, I] tensor; `gate` and `up` may be views of one
  packed gate|up product (unit last stride, any row stride). The sigmoid uses the kernels' vectorised
  exp, so results differ from torch's in the last bits (fp32: relative 1e-7).
- `rope_(q, k, cos, sin)`: rotates q [T, H, D] and k [T, Hkv, D] in place (views of the q|k|v product
  are fine) with the cos/sin rows of their positions [T, D]. In fp32 it computes exactly what the
  PyTorch form does (x1*cos - x2*sin, x2*cos + x1*sin, no fused multiply-add), so it is bit-identical.

- `rms_norm(x, weight, eps, residual=None)`: RMSNorm of [M, C] rows, optionally after the residual add
  (returning the sum too), one pass where torch's CPU rms_norm is six ops (17 us for one row of 128).
  The sum of squares is taken in another order than torch's, so fp32 results differ in the last bits.

All fall back to the PyTorch form off CPU, for other dtypes or layouts, without a compiler, or with
TANDEM_FUSED_KERNELS=0.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from serving.layers import cpu_extension

SOURCE = r"""
// out [M, I] = silu(gate) * up; gate, up [M, I] with unit last stride and row strides gs, us.
template <typename T>
static void silu_mul_impl(const T* gate, int64_t gs, const T* up, int64_t us, T* out, int64_t M, int64_t I) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* g = gate + m * gs;
      const T* u = up + m * us;
      T* o = out + m * I;
      int64_t i = 0;
      for (; i + W <= I; i += W) {
        const vf x = load(g + i);
        const vf e = exp_nonpositive(x < 0 ? x : -x);              // exp(-|x|), never overflows
        const vf sig = x < 0 ? e / (1.f + e) : 1.f / (1.f + e);   // sigmoid(x)
        store(o + i, x * sig * load(u + i));
      }
      for (; i < I; ++i) {
        const float x = static_cast<float>(g[i]);
        o[i] = static_cast<T>(x / (1.f + std::exp(-x)) * static_cast<float>(u[i]));
      }
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes(), "gate and up must be [M, I] alike");
  TORCH_CHECK(gate.stride(1) == 1 && up.stride(1) == 1, "gate and up need unit last strides");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "gate and up dtypes differ");
  auto out = torch::empty(gate.sizes(), gate.options());
  const int64_t M = gate.size(0), I = gate.size(1);
  if (gate.scalar_type() == torch::kFloat32)
    silu_mul_impl<float>(gate.data_ptr<float>(), gate.stride(0), up.data_ptr<float>(), up.stride(0),
                         out.data_ptr<float>(), M, I);
  else if (gate.scalar_type() == torch::kBFloat16)
    silu_mul_impl<c10::BFloat16>(gate.data_ptr<c10::BFloat16>(), gate.stride(0), up.data_ptr<c10::BFloat16>(),
                                 up.stride(0), out.data_ptr<c10::BFloat16>(), M, I);
  else
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
  return out;
}

// RoPE, "rotate half" layout, in place: for each of the `heads` rows of D values of token t (row stride rs,
// head stride D): x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, cos/sin rows [T, D]. No fused multiply-add,
// so fp32 results equal PyTorch's q*cos + rotate_half(q)*sin bit for bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
template <typename T>
static void rope_impl(T* x, int64_t rs, int64_t tokens, int64_t heads, int64_t D, const T* cos, const T* sin) {
  const int64_t half = D / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * D;
      const T* s = sin + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* r = x + t * rs + h * D;
        int64_t i = 0;
        for (; i + W <= half; i += W) {
          const vf x1 = load(r + i), x2 = load(r + i + half);
          const vf a = x1 * load(c + i), b = x2 * load(s + i);
          const vf e = x2 * load(c + i + half), f = x1 * load(s + i + half);
          store(r + i, a - b);
          store(r + i + half, e + f);
        }
        for (; i < half; ++i) {
          const float x1 = static_cast<float>(r[i]), x2 = static_cast<float>(r[i + half]);
          const float a = x1 * static_cast<float>(c[i]), b = x2 * static_cast<float>(s[i]);
          const float e = x2 * static_cast<float>(c[i + half]), f = x1 * static_cast<float>(s[i + half]);
          r[i] = static_cast<T>(a - b);
          r[i + half] = static_cast<T>(e + f);
        }
      }
    }
  });
}
#if !defined(__clang__)
#pragma GCC pop_options
#endif

void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2), "q, k: [T, H, D]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k.stride(2) == 1 && k.stride(1) == k.size(2),
              "q and k rows must be [H, D] contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == q.size(0) &&
              cos.size(1) == q.size(2) && sin.sizes() == cos.sizes(), "cos, sin: contiguous [T, D]");
  TORCH_CHECK(q.size(2) % 2 == 0, "head_dim must be even");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt, "dtypes differ");
  const int64_t T = q.size(0), D = q.size(2);
  if (dt == torch::kFloat32) {
    rope_impl<float>(q.data_ptr<float>(), q.stride(0), T, q.size(1), D, cos.data_ptr<float>(), sin.data_ptr<float>());
    rope_impl<float>(k.data_ptr<float>(), k.stride(0), T, k.size(1), D, cos.data_ptr<float>(), sin.data_ptr<float>());
  } else if (dt == torch::kBFloat16) {
    using B = c10::BFloat16;
    rope_impl<B>(q.data_ptr<B>(), q.stride(0), T, q.size(1), D, cos.data_ptr<B>(), sin.data_ptr<B>());
    rope_impl<B>(k.data_ptr<B>(), k.stride(0), T, k.size(1), D, cos.data_ptr<B>(), sin.data_ptr<B>());
  } else {
    TORCH_CHECK(false, "rope_: float32 or bfloat16 only");
  }
}

// RMSNorm of rows [M, C] (unit last stride, row stride xs): out = weight * (x * 1/sqrt(mean(x^2) + eps)), the
// statistics in fp32; in bf16 the normalised row is rounded to bf16 before the weight multiplies it, as the
// PyTorch form does. With `residual` ([M, C], unit last stride): sum = residual + x (rounded to T) is written
// and normalised, so the decoder layer's residual add and the next norm are one pass.
template <typename T>
static void rms_norm_impl(const T* x, int64_t xs, const T* residual, int64_t rs, T* sum, const T* weight, T* out,
                          int64_t M, int64_t C, float eps) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * xs;
      if (residual != nullptr) {                 // sum = residual + x, then normalise the sum
        const T* r = residual + m * rs;
        T* y = sum + m * C;
        int64_t i = 0;
        for (; i + W <= C; i += W) store(y + i, load(r + i) + load(row + i));
        for (; i < C; ++i) y[i] = static_cast<T>(static_cast<float>(r[i]) + static_cast<float>(row[i]));
        row = y;
      }
      vf acc{};
      int64_t i = 0;
      for (; i + W <= C; i += W) { const vf v = load(row + i); acc += v * v; }
      float ss = hsum(acc);
      for (; i < C; ++i) { const float v = static_cast<float>(row[i]); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      T* o = out + m * C;
      i = 0;
      if constexpr (std::is_same<T, float>::value) {
        for (; i + W <= C; i += W) store(o + i, load(weight + i) * (load(row + i) * inv));
      }
      for (; i < C; ++i) {
        const T normed = static_cast<T>(static_cast<float>(row[i]) * inv);
        o[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
      }
    }
  });
}

// [out] = [rms_norm(x)], or with a residual [sum, out] = [residual + x, rms_norm(residual + x)].
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    std::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, C] with unit last stride");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight must be [C]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight dtypes differ");
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                residual->scalar_type() == x.scalar_type(), "residual must be like x, with unit last stride");
  auto out = torch::empty(x.sizes(), x.options());
  auto sum = residual.has_value() ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
  const int64_t M = x.size(0), C = x.size(1), rs = residual.has_value() ? residual->stride(0) : 0;
  const float e = static_cast<float>(eps);
#define TANDEM_RMS(T)                                                                                        \
  rms_norm_impl<T>(x.data_ptr<T>(), x.stride(0), residual.has_value() ? residual->data_ptr<T>() : nullptr, rs, \
                   residual.has_value() ? sum.data_ptr<T>() : nullptr, weight.data_ptr<T>(), out.data_ptr<T>(),  \
                   M, C, e)
  if (x.scalar_type() == torch::kFloat32)
    TANDEM_RMS(float);
  else if (x.scalar_type() == torch::kBFloat16)
    TANDEM_RMS(c10::BFloat16);
  else
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
#undef TANDEM_RMS
  if (residual.has_value()) return {sum, out};
  return {out};
}
"""
FUNCTIONS = ("silu_mul", "rope_", "rms_norm")

ENABLED = os.environ.get("TANDEM_FUSED_KERNELS", "1") != "0"   # benchmarks flip it to time the PyTorch forms
DTYPES = (torch.float32, torch.bfloat16)


def _usable(x: torch.Tensor) -> bool:
    return ENABLED and x.device.type == "cpu" and x.dtype in DTYPES and cpu_extension.load() is not None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [M, I] tensors (views of one gate|up product included)."""
    if gate.dim() == 2 and gate.stride(-1) == 1 and up.stride(-1) == 1 and _usable(gate):
        return cpu_extension.load().silu_mul(gate, up)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of rows x [M, C] in one pass, or with `residual` (residual + x, RMSNorm(residual + x)) in one;
    None where the kernel does not serve these tensors (the caller keeps its PyTorch form)."""
    if not (x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype and _usable(x)):
        return None
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype):
        return None
    got = cpu_extension.load().rms_norm(x, weight, eps, residual)
    return got[0] if residual is None else (got[0], got[1])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [T, H, D] and k [T, Hkv, D] with cos/sin [T, 1, D]; in place when the kernel serves it."""
    if _usable(q) and cpu_extension.rows_contiguous(q, k) and cos.dtype == q.dtype and k.dtype == q.dtype:
        cpu_extension.load().rope_(q, k, cos.reshape(cos.shape[0], -1).contiguous(),
                                   sin.reshape(sin.shape[0], -1).contiguous())
        return q, k
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
