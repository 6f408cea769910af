"""Decode attention that reads the paged KV cache in place: a C++ kernel of serving/layers/cpu_extension.py.

For every decoding sequence the kernel walks its block table and, per KV head, scores the query heads of
that head (GQA: query heads h*G .. h*G+G-1 share KV head h) against each cached key where it lies in the
cache (one key row read once for all G of them), takes the softmax (a vectorised exp), and sums the value
rows, also in place. Nothing is gathered or padded: the bucketed SDPA path copies every sequence's keys
and values out of the cache for every layer and step, which on CPU costs more than the attention itself.
fp32 and bf16 (bf16 is widened as it is read; scores and sums are fp32); head sizes that are whole
16-lane vectors up to 128 (TinyStories' 16 included). Elsewhere (no compiler, CUDA, another head size,
TANDEM_PAGED_KERNEL=0) `available()` is False and attention.py keeps its pure-PyTorch path.
"""

from __future__ import annotations

import os

import torch

from serving.layers import cpu_extension

SOURCE = r"""
// visit(row, t) for the cached rows t = 0 .. L-1 of one sequence, in order, where they lie in the cache
template <typename T, typename Visit>
static inline void for_each_row(const T* cache, const int64_t* table, int64_t L, int64_t bs, int64_t block_stride,
                                int64_t token_stride, Visit&& visit) {
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const int64_t n = std::min(bs, L - t0);
    const T* base = cache + table[blk] * block_stride;
    for (int64_t j = 0; j < n; ++j) visit(base + j * token_stride, t0 + j);
  }
}

// One decoding sequence, all its heads: NV = head_dim / 16 vectors per row.
// scores [H, Lp] and acc [H, NV] are scratch owned by the calling thread.
template <int NV, typename T>
static void decode_one(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t L, T* out,
                       int64_t H, int64_t Hkv, int64_t bs, int64_t block_stride, int64_t token_stride, float scale,
                       std::vector<float>& scores, std::vector<vf>& qs, std::vector<vf>& acc) {
  constexpr int64_t D = NV * W;
  const int64_t G = H / Hkv;
  const int64_t Lp = (L + W - 1) / W * W;
  scores.resize(H * Lp);
  qs.resize(H * NV);
  acc.assign(H * NV, vf{});
  for (int64_t h = 0; h < H; ++h)
    for (int v = 0; v < NV; ++v) qs[h * NV + v] = load(q + h * D + v * W) * scale;
  // scores: every key row is read once, for the G query heads that share its KV head
  for_each_row(kc, table, L, bs, block_stride, token_stride, [&](const T* row, int64_t t) {
    for (int64_t h = 0; h < Hkv; ++h) {
      vf k[NV];
      for (int v = 0; v < NV; ++v) k[v] = load(row + h * D + v * W);
      for (int64_t g = 0; g < G; ++g) {
        const vf* qg = qs.data() + (h * G + g) * NV;
        vf a = qg[0] * k[0];
        for (int v = 1; v < NV; ++v) a += qg[v] * k[v];
        scores[(h * G + g) * Lp + t] = hsum(a);
      }
    }
  });
  // softmax per query head, 16 positions at a time (the padding past L becomes exactly 0)
  std::vector<float> inv(H);
  for (int64_t hq = 0; hq < H; ++hq) {
    float* s = scores.data() + hq * Lp;
    for (int64_t t = L; t < Lp; ++t) s[t] = -3.0e38f;
    vf m = load(s);
    for (int64_t t = W; t < Lp; t += W) { const vf x = load(s + t); m = m > x ? m : x; }
    const float mx = hmax(m);
    vf total{};
    for (int64_t t = 0; t < Lp; t += W) {
      const vf e = exp_nonpositive(load(s + t) - mx);
      store(s + t, e);
      total += e;
    }
    inv[hq] = 1.f / hsum(total);
  }
  // weighted sum of the value rows, read once for the G query heads of their KV head
  for_each_row(vc, table, L, bs, block_stride, token_stride, [&](const T* row, int64_t t) {
    for (int64_t h = 0; h < Hkv; ++h) {
      vf x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load(row + h * D + v * W);
      for (int64_t g = 0; g < G; ++g) {
        const vf p = splat(scores[(h * G + g) * Lp + t]);
        vf* ag = acc.data() + (h * G + g) * NV;
        for (int v = 0; v < NV; ++v) ag[v] += p * x[v];
      }
    }
  });
  for (int64_t hq = 0; hq < H; ++hq)
    for (int v = 0; v < NV; ++v) store(out + hq * D + v * W, acc[hq * NV + v] * inv[hq]);
}

template <int NV, typename T>
static void decode_all(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens, T* out,
                       int64_t B, int64_t H, int64_t Hkv, int64_t bs, int64_t max_blocks, int64_t block_stride,
                       int64_t token_stride, float scale) {
  constexpr int64_t D = NV * W;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<vf> qs, acc;
    for (int64_t b = begin; b < end; ++b)
      decode_one<NV, T>(q + b * H * D, kc, vc, tables + b * max_blocks, lens[b], out + b * H * D, H, Hkv, bs,
                        block_stride, token_stride, scale, scores, qs, acc);
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
  TORCH_CHECK(D % W == 0 && D <= 8 * W, "head_dim must be a multiple of 16, at most 128");
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
  switch (D / W) {
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
