"""Decode attention that reads the paged KV cache in place: a C++ kernel of serving/layers/cpu_extension.py.

For every decoding sequence the kernel walks its block table once into a list of row offsets, then per
query head (GQA: query heads h*G .. h*G+G-1 read KV head h) scores the cached keys where they lie in the
cache, 8 positions at a time (their 8 horizontal sums reduced together, a third of the shuffles of one
sum each), takes the softmax (a vectorised exp), and sums the value rows, also in place. Nothing is
gathered or padded: the bucketed SDPA path copies every sequence's keys and values out of the cache for
every layer and step, which on CPU costs more than the attention itself.
fp32 and bf16 (bf16 is widened as it is read; scores and sums are fp32); head sizes that are multiples
of 16 up to 128 (TinyStories' 16 included). Elsewhere (no compiler, CUDA, another head size,
TANDEM_PAGED_KERNEL=0) `available()` is False and attention.py keeps its pure-PyTorch path.
"""

from __future__ import annotations

import os

import torch

from serving.layers import cpu_extension

SOURCE = r"""
// One decoding sequence, all its heads; D = NV * 16 (NV16 * 2 vectors per row). rows [Lp] and scores [H, Lp]
// are scratch owned by the calling thread; Lp = L rounded up to 16.
// Per query head (GQA: head hq reads KV head hq / G): its scores, 8 positions at a time, each the horizontal
// sum of the q * k products, done for the 8 at once (hsums); the softmax over them with the vectorised exp;
// then the weighted sum of the value rows with two accumulators (alternate positions) to hide the FMA
// latency. Rows are read where they lie in the cache (rows[t] = offset of position t); a query head's key
// and value rows stay in L1/L2 for the next query head of the same KV head.
template <int NV16, typename T>
static void decode_one(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t L, T* out,
                       int64_t H, int64_t Hkv, int64_t bs, int64_t block_stride, int64_t token_stride, float scale,
                       std::vector<int64_t>& rows, std::vector<float>& scores) {
  constexpr int NV = NV16 * 16 / W;
  constexpr int64_t D = NV * W;
  const int64_t G = H / Hkv;
  const int64_t Lp = (L + 15) / 16 * 16;
  rows.resize(Lp);
  scores.resize(Lp);
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const int64_t base = table[blk] * block_stride, n = std::min(bs, L - t0);
    for (int64_t j = 0; j < n; ++j) rows[t0 + j] = base + j * token_stride;
  }
  for (int64_t t = L; t < Lp; ++t) rows[t] = rows[L - 1];   // padding positions: scored, then masked to 0
  float* s = scores.data();
  for (int64_t hq = 0; hq < H; ++hq) {
    const int64_t off = hq / G * D;
    vf qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = load(q + hq * D + v * W) * scale;
    for (int64_t t0 = 0; t0 < Lp; t0 += W) {
      vf prod[W];
      for (int j = 0; j < W; ++j) {
        const T* k = kc + rows[t0 + j] + off;
        vf x = qv[0] * load(k);
        for (int v = 1; v < NV; ++v) x += qv[v] * load(k + v * W);
        prod[j] = x;
      }
      store(s + t0, hsums(prod));
    }
    for (int64_t t = L; t < Lp; ++t) s[t] = -3.0e38f;
    vf m = load(s);
    for (int64_t t = W; t < Lp; t += W) { const vf x = load(s + t); m = m > x ? m : x; }
    const float mx = hmax(m);
    vf total{};
    for (int64_t t = 0; t < Lp; t += W) {      // padding positions become exactly 0
      const vf e = exp_nonpositive(load(s + t) - mx);
      store(s + t, e);
      total += e;
    }
    const float inv = 1.f / hsum(total);
    vf even[NV], odd[NV];
    for (int v = 0; v < NV; ++v) even[v] = odd[v] = vf{};
    for (int64_t t = 0; t < Lp; t += 2) {
      const T* x0 = vc + rows[t] + off;
      const T* x1 = vc + rows[t + 1] + off;
      const vf p0 = splat(s[t]), p1 = splat(s[t + 1]);
      for (int v = 0; v < NV; ++v) {
        even[v] += p0 * load(x0 + v * W);
        odd[v] += p1 * load(x1 + v * W);
      }
    }
    for (int v = 0; v < NV; ++v) store(out + hq * D + v * W, (even[v] + odd[v]) * inv);
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
