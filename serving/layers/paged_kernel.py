"""Decode attention that reads the paged KV cache in place: a small C++ kernel, compiled once and cached.

For every decoding sequence and KV head, the kernel walks the sequence's block table, scores the
query heads of that KV head (GQA: query heads h*G .. h*G+G-1 share KV head h) against each cached key
where it lies in the cache, takes the softmax and sums the values, also in place. Nothing is gathered
or padded: the bucketed SDPA path copies every sequence's keys and values out of the cache for every
layer and step, which on CPU costs more than the attention itself (memory traffic). fp32 and bf16
(bf16 is converted to fp32 as it is read; scores and sums are fp32).

The kernel is built with torch.utils.cpp_extension.load_inline on first use (g++, about a minute,
logged; cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, so later starts load it in
well under a second). Without a compiler, on CUDA, or with TANDEM_PAGED_KERNEL=0, `available()` is
False and attention.py keeps its pure-PyTorch path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Element i of a cached row as fp32 (bf16: its bits << 16, which g++ vectorizes inline).
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const double* p, int64_t i) { return static_cast<float>(p[i]); }
static inline float ld(const c10::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// out[g * stride] = q_g . k for the G query heads of one KV head: k is read once for all of them.
template <typename T>
static inline void dot_heads(const float* q, const T* k, int64_t G, int64_t D, float* out, int64_t stride) {
  constexpr int W = 16;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t ng = std::min<int64_t>(4, G - g0);
    float acc[4][W] = {};
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      float kv[W];
      for (int i = 0; i < W; ++i) kv[i] = ld(k, d + i);
      for (int64_t g = 0; g < ng; ++g) {
        const float* qg = q + (g0 + g) * D + d;
        for (int i = 0; i < W; ++i) acc[g][i] += qg[i] * kv[i];
      }
    }
    for (int64_t g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int64_t e = d; e < D; ++e) s += q[(g0 + g) * D + e] * ld(k, e);
      for (int i = 0; i < W; ++i) s += acc[g][i];
      out[(g0 + g) * stride] = s;
    }
  }
}

template <typename T>
static void decode_impl(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens, T* out,
                        int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                        int64_t block_stride, int64_t token_stride, float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, sum(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t L = lens[b];
      scores.resize(G * L);
      const T* qb = q + (b * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qb[i]) * scale;
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
        const int64_t n = std::min(bs, L - t0);
        const T* kblock = kc + table[blk] * block_stride + h * D;
        for (int64_t j = 0; j < n; ++j) dot_heads(qf.data(), kblock + j * token_stride, G, D, scores.data() + t0 + j, L);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = sg[0];
        for (int64_t t = 1; t < L; ++t) m = std::max(m, sg[t]);
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); total += sg[t]; }
        sum[g] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
        const int64_t n = std::min(bs, L - t0);
        const T* vblock = vc + table[blk] * block_stride + h * D;
        for (int64_t j = 0; j < n; ++j) {
          const T* v = vblock + j * token_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * L + t0 + j];
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] += p * ld(v, d);
          }
        }
      }
      T* ob = out + (b * H + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) ob[g * D + d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

// q [B, H, D] contiguous; k_cache, v_cache [num_blocks, block_size, Hkv, D] (last two dims contiguous);
// block_tables [B, max_blocks] int64; context_lens [B] int64 (>= 1). Returns [B, H, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides(), "caches must be [N, bs, Hkv, D] alike");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3), "cache rows must be contiguous");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && block_tables.is_contiguous(), "block_tables: int64 [B, M]");
  TORCH_CHECK(context_lens.dtype() == torch::kInt64 && context_lens.is_contiguous(), "context_lens: int64 [B]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes differ");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2), bs = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "head counts / head_dim do not match the cache");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_decode", [&] {
    decode_impl<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                          block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                          out.data_ptr<scalar_t>(), B, H, Hkv, D, bs, block_tables.size(1),
                          k_cache.stride(0), k_cache.stride(1), static_cast<float>(scale));
  });
  return out;
}
"""

_lock = threading.Lock()
_module = None
_failed = False
ENABLED = True      # benchmarks flip it to time the PyTorch path in the same process



def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (a -march=native build runs only where it was built)."""
    import hashlib

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        info = platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]

def _load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("TANDEM_PAGED_KERNEL", "1") == "0":
            _failed = True
            return None
        from torch.utils.cpp_extension import load_inline

        started = time.perf_counter()
        log.info("loading the paged decode attention kernel (the first start compiles it with g++, ~1 min; cached)")
        try:
            # -march=native: the build is only valid on this CPU, so the cache entry is named after it
            _module = load_inline(name=f"tandem_paged_decode_v3_{_cpu_tag()}", cpp_sources=[SOURCE],
                                  functions=["paged_decode"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers...: keep the PyTorch path
            _failed = True
            log.warning("paged decode kernel unavailable (%s: %s); using the PyTorch attention path",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        log.info("paged decode kernel ready in %.1f s", time.perf_counter() - started)
        return _module


MIN_HEAD_DIM = 32   # below this (TinyStories: 16) SDPA over gathered buckets measured faster


def available(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """True when the kernel serves this device/dtype/head size (loading, on a first start compiling, it once)."""
    if not ENABLED or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if head_dim is not None and head_dim < MIN_HEAD_DIM:
        return False
    return _load() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D], attending each row to its first context_lens[b] cached positions."""
    return _module.paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)
