"""Decode attention that reads the paged KV cache in place: a C++ kernel of serving/layers/cpu_extension.py.

For every decoding sequence the kernel walks its block table once into a list of row offsets, then takes
the query heads 8 at a time (GQA: query heads h*G .. h*G+G-1 read KV head h) and reads the cached rows
where they lie in the cache, in order, prefetching a few rows ahead: per row, the 8 heads' dot products
are reduced together into one vector of 8 scores (a third of the shuffles of 8 separate sums), the
softmax runs down those token-major scores 8 heads per instruction (a vectorised exp), and the value rows
are summed in a second in-order pass. Nothing is gathered or padded: the bucketed SDPA path copies every
sequence's keys and values out of the cache for every layer and step, which on CPU costs more than the
attention itself. Against a kernel that walked the rows once per query head (8 positions per reduction),
this reads each row once per 8 heads and streams it: batch 64, D=64, out of cache, 2.3x.
fp32 and bf16 (scores and sums are fp32; bf16 values are widened as they are read, and on a CPU with
AVX512-BF16 the key rows are not: VDPBF16PS multiplies bf16 pairs exactly into fp32, which made the bf16
kernel 1.36x faster at batch 64, D=64, and the 32M Llama's bf16 workload 1242 -> 1585-1617 tok/s on 1 thread;
the same tests run whichever path the CPU builds); head sizes that are multiples
of 16 up to 128 (TinyStories' 16 included). Elsewhere (no compiler, CUDA, another head size,
TANDEM_PAGED_KERNEL=0) `available()` is False and attention.py keeps its pure-PyTorch path.
"""

from __future__ import annotations

import os

import torch

from serving.layers import cpu_extension

SOURCE = r"""
// One decoding sequence, all its heads; D = NV16 * 16. rows [L] and scores [L, W] are scratch owned by the
// calling thread. The query heads are taken W (8) at a time, token by token: each cached row is read
// where it lies in the cache, in order (the next rows are prefetched: blocks lie anywhere in the cache),
// and the 8 heads' dot products with it are reduced together (hsums: one vector of 8 scores per token).
// So the scores are token-major and the softmax runs down the columns, 8 heads per instruction.
constexpr int64_t PREFETCH_ROWS = 4;

// bf16 on a CPU with AVX512-BF16: the key rows are not widened; VDPBF16PS (256-bit form) multiplies 16 bf16
// pairs into 8 fp32 lanes per instruction, each product exact in fp32 (against 2 widenings and 2 FMAs).
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __m256bh load_bh(const c10::BFloat16* p) {
  return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline vf dot_bh(vf acc, __m256bh a, __m256bh b) { return (vf)_mm256_dpbf16_ps((__m256)acc, a, b); }
#endif

// Row t + PREFETCH_ROWS of `cache` (if there is one) on its way into cache, every line of it.
template <typename T>
static inline void prefetch_ahead(const T* cache, const std::vector<int64_t>& rows, int64_t t, int64_t L,
                                  int64_t row_len) {
  constexpr int64_t LINE = 64 / sizeof(T);
  if (t + PREFETCH_ROWS < L)
    for (int64_t c = 0; c < row_len; c += LINE) __builtin_prefetch(cache + rows[t + PREFETCH_ROWS] + c);
}

// Walk the cached key rows in order (prefetching ahead): the W heads' scores `dot(g, row)` of each, times
// `post`, token-major into s; returns their maxima.
template <typename T, typename Dot>
static vf score_rows(const T* kc, const std::vector<int64_t>& rows, int64_t L, const int64_t* off, float post,
                     float* s, int64_t row_len, Dot dot) {
  vf m = splat(-3.0e38f);
  for (int64_t t = 0; t < L; ++t) {
    prefetch_ahead(kc, rows, t, L, row_len);
    const T* row = kc + rows[t];
    vf prod[W];
    for (int g = 0; g < W; ++g) prod[g] = dot(g, row + off[g]);
    const vf sc = hsums(prod) * post;
    store(s + t * W, sc);
    m = m > sc ? m : sc;
  }
  return m;
}

// The W heads h0.. (nh of them real) against every cached key row: scaled scores into s, their maxima back.
template <int NV16, typename T>
static vf scores_of(const T* q, const T* kc, const std::vector<int64_t>& rows, int64_t L, int64_t h0, int nh,
                    const int64_t* off, float scale, float* s, int64_t row_len) {
  constexpr int NV = NV16 * 16 / W;
  constexpr int64_t D = NV * W;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {      // q stays bf16, the scale goes on the scores
    __m256bh qb[W][NV16];
    for (int g = 0; g < W; ++g)
      for (int c = 0; c < NV16; ++c)
        qb[g][c] = g < nh ? load_bh(q + (h0 + g) * D + c * 16) : (__m256bh)_mm256_setzero_si256();
    return score_rows(kc, rows, L, off, scale, s, row_len, [&](int g, const T* r) {
      vf x{};
      for (int c = 0; c < NV16; ++c) x = dot_bh(x, qb[g][c], load_bh(r + c * 16));
      return x;
    });
  }
#endif
  vf qv[W][NV];
  for (int g = 0; g < W; ++g)
    for (int v = 0; v < NV; ++v) qv[g][v] = g < nh ? load(q + (h0 + g) * D + v * W) * scale : vf{};
  return score_rows(kc, rows, L, off, 1.f, s, row_len, [&](int g, const T* r) {
    vf x = qv[g][0] * load(r);
    for (int v = 1; v < NV; ++v) x += qv[g][v] * load(r + v * W);
    return x;
  });
}

template <int NV16, typename T>
static void decode_one(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t L, T* out,
                       int64_t H, int64_t Hkv, int64_t bs, int64_t block_stride, int64_t token_stride, float scale,
                       std::vector<int64_t>& rows, std::vector<float>& scores) {
  constexpr int NV = NV16 * 16 / W;
  constexpr int64_t D = NV * W;
  const int64_t G = H / Hkv, row_len = Hkv * D;
  rows.resize(L);
  scores.resize(L * W);
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const int64_t base = table[blk] * block_stride, n = std::min(bs, L - t0);
    for (int64_t j = 0; j < n; ++j) rows[t0 + j] = base + j * token_stride;
  }
  float* s = scores.data();
  for (int64_t h0 = 0; h0 < H; h0 += W) {
    const int nh = static_cast<int>(std::min<int64_t>(W, H - h0));   // a last group of fewer heads: zero lanes
    int64_t off[W];                                                   // each head's KV head within a row
    for (int g = 0; g < W; ++g) off[g] = g < nh ? (h0 + g) / G * D : 0;
    const vf m = scores_of<NV16, T>(q, kc, rows, L, h0, nh, off, scale, s, row_len);
    vf total{};
    for (int64_t t = 0; t < L; ++t) {
      const vf e = exp_nonpositive(load(s + t * W) - m);
      store(s + t * W, e);
      total += e;
    }
    const vf inv = 1.f / total;
    vf acc[W][NV];
    for (int g = 0; g < W; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v] = vf{};
    for (int64_t t = 0; t < L; ++t) {
      prefetch_ahead(vc, rows, t, L, row_len);
      const T* row = vc + rows[t];
      for (int g = 0; g < nh; ++g) {
        const vf p = splat(s[t * W + g]);
        for (int v = 0; v < NV; ++v) acc[g][v] += p * load(row + off[g] + v * W);
      }
    }
    for (int g = 0; g < nh; ++g)
      for (int v = 0; v < NV; ++v) store(out + (h0 + g) * D + v * W, acc[g][v] * inv[g]);
  }
}

template <int NV16, typename T>
static void decode_all(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens, T* out,
                       int64_t B, int64_t H, int64_t Hkv, int64_t bs, int64_t max_blocks, int64_t block_stride,
                       int64_t token_stride, float scale) {
  constexpr int64_t D = NV16 * 16;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows;
    std::vector<float> scores;
    for (int64_t b = begin; b < end; ++b)
      decode_one<NV16, T>(q + b * H * D, kc, vc, tables + b * max_blocks, lens[b], out + b * H * D, H, Hkv, bs,
                          block_stride, token_stride, scale, rows, scores);
  });
}

// q [B, H, D] contiguous; k_cache, v_cache [num_blocks, block_size, Hkv, D] (last two dims contiguous);
// block_tables [B, max_blocks] int64; context_lens [B] int64 (>= 1); D a multiple of 16, at most 128.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides(), "caches must be [N, bs, Hkv, D] alike");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3), "cache rows must be contiguous");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && block_tables.is_contiguous(), "block_tables: int64 [B, M]");
  TORCH_CHECK(context_lens.dtype() == torch::kInt64 && context_lens.is_contiguous(), "context_lens: int64 [B]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes differ");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2), bs = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "head counts / head_dim do not match the cache");
  TORCH_CHECK(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  auto out = torch::empty_like(q);
  const float s = static_cast<float>(scale);
#define TANDEM_DECODE(NV)                                                                                       \
  case NV:                                                                                                      \
    if (q.scalar_type() == torch::kFloat32)                                                                     \
      decode_all<NV, float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),          \
                            block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),                 \
                            out.data_ptr<float>(), B, H, Hkv, bs, block_tables.size(1), k_cache.stride(0),      \
                            k_cache.stride(1), s);                                                              \
    else                                                                                                        \
      decode_all<NV, c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),             \
                                    v_cache.data_ptr<c10::BFloat16>(), block_tables.data_ptr<int64_t>(),         \
                                    context_lens.data_ptr<int64_t>(), out.data_ptr<c10::BFloat16>(), B, H, Hkv,  \
                                    bs, block_tables.size(1), k_cache.stride(0), k_cache.stride(1), s);          \
    break;
  switch (D / 16) {
    TANDEM_DECODE(1) TANDEM_DECODE(2) TANDEM_DECODE(3) TANDEM_DECODE(4) TANDEM_DECODE(5) TANDEM_DECODE(6)
    TANDEM_DECODE(7) TANDEM_DECODE(8)
  }
#undef TANDEM_DECODE
  return out;
}
"""
FUNCTIONS = ("paged_decode",)

ENABLED = os.environ.get("TANDEM_PAGED_KERNEL", "1") != "0"   # benchmarks flip it to time the PyTorch path
HEAD_DIMS = tuple(range(16, 129, 16))   # the kernel's head sizes: whole 16-lane vectors, up to 128


def available(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """True when the kernel serves this device/dtype/head size (loading, on a first start compiling, it once)."""
    if not ENABLED or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return False
    return cpu_extension.load() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D], attending each row to its first context_lens[b] cached positions."""
    return cpu_extension.load().paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)
