"""Decode attention that reads the paged KV cache in place: a C++ kernel of serving/layers/cpu_extension.py.

For every decoding sequence the kernel walks its cache block by block, in the order of its block table,
twice: the key rows for the scores, then (after a softmax down each head's scores, a vectorised exp) the
value rows for the sums. Within a block, the query heads that share a KV head (GQA: heads h*G .. h*G+G-1
read KV head h) are taken GH at a time, GH a power of two dividing G whose sums fit in registers (2 for
D=64), so a KV head's slice of a row is loaded, and in bf16 widened, once for all of them, and no running
sum leaves its register inside a block; W / GH rows' dot products are reduced together into one vector of
8 scores. While a group reads its slice of a block, it prefetches its slice of the next block. Nothing is
gathered or padded: the bucketed SDPA path copies every sequence's keys and values out of the cache for
every layer and step, which on CPU costs more than the attention itself. Against the previous kernel (all
8 heads of a row at once, token by token: 64 running sums, which spilled), with cache-resident rows 1.5x
(fp32) and 1.3x (bf16) faster; out of cache it is bound by memory, as the workload is: 10-11 GB/s from
DRAM on one core, the 32M Llama's bf16 decode attention 9% faster. The sequences are split between
threads by their cached rows, not their count. A row need not be a decode: attention.py also hands it
the tokens of short prompt chunks, one row each, attending to the positions up to its own.
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
// One decoding sequence, all its heads; D = NV * W. The cache is walked block by block, in the order of the
// block table, twice: once for the keys (scores), then, after the softmax, once for the values. Within a
// block, the query heads that read one KV head are taken GH at a time (GH a power of two dividing H / Hkv,
// with GH * NV <= 16: their query or their sums stay in registers), so a KV head's slice of a cached row is
// loaded (for bf16, widened) once for all GH heads; while the first group of heads reads a block, the next
// block of the table is prefetched, row by row, whole (blocks lie anywhere in the cache, and a block's rows
// are contiguous: read block by block, the cache streams). Scores are head-major, s[h * ls + t], and W / GH
// rows' GH dot products are reduced together (hsums: one vector of 8 scores).

// bf16 on a CPU with AVX512-BF16: the key rows are not widened; VDPBF16PS (256-bit form) multiplies 16 bf16
// pairs into 8 fp32 lanes per instruction, each product exact in fp32 (against 2 widenings and 2 FMAs).
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __m256bh load_bh(const c10::BFloat16* p) {
  return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline vf dot_bh(vf acc, __m256bh a, __m256bh b) { return (vf)_mm256_dpbf16_ps((__m256)acc, a, b); }
#endif

// One block of a sequence's cache, and the next one of its table (next == nullptr: none) to prefetch.
template <typename T>
struct Block {
  const T* rows;        // its first row (row j at rows + j * stride)
  int64_t n;            // rows of it in the sequence
  const T* next;
  int64_t next_n;
  int64_t stride;       // elements from one row to the next
  int64_t row_len;      // elements of a whole row (all KV heads)
};

// Columns [col, col + len) of row j of the next block on their way into cache.
template <typename T>
static inline void prefetch_next(const Block<T>& b, int64_t j, int64_t col, int64_t len) {
  constexpr int64_t LINE = 64 / sizeof(T);
  if (b.next != nullptr && j < b.next_n)
    for (int64_t c = 0; c < len; c += LINE) __builtin_prefetch(b.next + j * b.stride + col + c);
}

// Scores of GH query heads against column `col` of the block's key rows, times `post`, into s[g * ls + t0 + j];
// the running maxima m (lane r * GH + g) grow. `dot(row, prod)` writes the GH heads' products with one row;
// R = W / GH rows' products are reduced at once.
template <int GH, int64_t D, typename T, typename Dot>
static void score_block(const Block<T>& b, int64_t col, bool fetch, float post, float* s, int64_t ls, int64_t t0,
                        vf& running, Dot dot) {
  constexpr int R = W / GH;
  vf m = running;
  for (int64_t j0 = 0; j0 < b.n; j0 += R) {
    vf prod[W];
    const int n = static_cast<int>(std::min<int64_t>(R, b.n - j0));
    for (int r = 0; r < R; ++r) {
      if (r < n) {
        if (fetch) prefetch_next(b, j0 + r, col, D);
        dot(b.rows + (j0 + r) * b.stride + col, prod + r * GH);
      } else {
        for (int g = 0; g < GH; ++g) prod[r * GH + g] = vf{};
      }
    }
    vf sc = hsums(prod) * post;
    if (n < R) {                                    // a partial group: its empty lanes hold no score
      const vi lane = vi{0, 1, 2, 3, 4, 5, 6, 7};
      sc = lane < n * GH ? sc : splat(-3.0e38f);
    }
    m = m > sc ? m : sc;
    for (int r = 0; r < n; ++r)
      for (int g = 0; g < GH; ++g) s[g * ls + t0 + j0 + r] = sc[r * GH + g];
  }
  running = m;
}

// The GH heads' score-weighted sums of column `col` of the block's value rows, added to acc[g * D].
template <int GH, int NV, typename T>
static void value_block(const Block<T>& b, int64_t col, bool fetch, const float* s, int64_t ls, int64_t t0,
                        float* acc_out) {
  constexpr int64_t D = NV * W;
  vf acc[GH][NV];
  for (int g = 0; g < GH; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = load(acc_out + g * D + v * W);
  for (int64_t j = 0; j < b.n; ++j) {
    if (fetch) prefetch_next(b, j, col, D);
    const T* row = b.rows + j * b.stride + col;
    vf p[GH];
    for (int g = 0; g < GH; ++g) p[g] = splat(s[g * ls + t0 + j]);
    for (int v = 0; v < NV; ++v) {
      const vf x = load(row + v * W);
      for (int g = 0; g < GH; ++g) acc[g][v] += p[g] * x;
    }
  }
  for (int g = 0; g < GH; ++g)
    for (int v = 0; v < NV; ++v) store(acc_out + g * D + v * W, acc[g][v]);
}

// Scratch of one thread: rows' scores [H, ls], per-head maxima and sums [H, D].
struct Scratch {
  std::vector<float> scores, sums, inv;
  std::vector<vf> maxima;
};

template <int GH, int NV, typename T>
static void decode_seq(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t L, T* out, int64_t H,
                       int64_t Hkv, int64_t bs, int64_t block_stride, int64_t token_stride, float scale, Scratch& w) {
  constexpr int64_t D = NV * W;
  const int64_t G = H / Hkv, ls = (L + W - 1) / W * W, blocks = (L + bs - 1) / bs;
  w.scores.assign(H * ls, -3.0e38f);        // the padding past L stays -3e38: no weight
  w.sums.assign(H * D, 0.f);
  float* s = w.scores.data();
  auto block = [&](const T* cache, int64_t k) {
    const int64_t n = std::min(bs, L - k * bs);
    const bool more = k + 1 < blocks;
    return Block<T>{cache + table[k] * block_stride, n, more ? cache + table[k + 1] * block_stride : nullptr,
                    more ? std::min(bs, L - (k + 1) * bs) : 0, token_stride, Hkv * D};
  };
  w.maxima.assign(H / GH, splat(-3.0e38f));
  for (int64_t k = 0; k < blocks; ++k) {
    const Block<T> b = block(kc, k);
    for (int64_t h = 0; h < H; h += GH) {
      const int64_t col = h / G * D;
      vf& m = w.maxima[h / GH];
      const bool fetch = h % G == 0;    // the first group of a KV head prefetches its slice of the next block
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {      // q stays bf16, the scale goes on the scores
        constexpr int NV16 = NV / 2;
        __m256bh qb[GH][NV16];
        for (int g = 0; g < GH; ++g)
          for (int c = 0; c < NV16; ++c) qb[g][c] = load_bh(q + (h + g) * D + c * 16);
        score_block<GH, D>(b, col, fetch, scale, s + h * ls, ls, k * bs, m, [&](const T* r, vf* prod) {
          for (int g = 0; g < GH; ++g) prod[g] = vf{};
          for (int c = 0; c < NV16; ++c) {
            const __m256bh kv = load_bh(r + c * 16);
            for (int g = 0; g < GH; ++g) prod[g] = dot_bh(prod[g], qb[g][c], kv);
          }
        });
        continue;
      }
#endif
      vf qv[GH][NV];
      for (int g = 0; g < GH; ++g)
        for (int v = 0; v < NV; ++v) qv[g][v] = load(q + (h + g) * D + v * W) * scale;
      score_block<GH, D>(b, col, fetch, 1.f, s + h * ls, ls, k * bs, m, [&](const T* r, vf* prod) {
        for (int g = 0; g < GH; ++g) prod[g] = vf{};
        for (int v = 0; v < NV; ++v) {
          const vf kv = load(r + v * W);
          for (int g = 0; g < GH; ++g) prod[g] += qv[g][v] * kv;
        }
      });
    }
  }
  w.inv.resize(H);
  float* inv = w.inv.data();
  for (int64_t h = 0; h < H; ++h) {
    const vf& m = w.maxima[h / GH];
    float best = -3.0e38f;
    for (int r = 0; r < W / GH; ++r) best = std::max(best, m[r * GH + h % GH]);
    float* sh = s + h * ls;
    vf total{};
    for (int64_t t = 0; t < ls; t += W) {
      const vf e = exp_nonpositive(load(sh + t) - best);
      store(sh + t, e);
      total += e;
    }
    inv[h] = 1.f / hsum(total);
  }
  for (int64_t k = 0; k < blocks; ++k) {
    const Block<T> b = block(vc, k);
    for (int64_t h = 0; h < H; h += GH)
      value_block<GH, NV, T>(b, h / G * D, h % G == 0, s + h * ls, ls, k * bs, w.sums.data() + h * D);
  }
  for (int64_t h = 0; h < H; ++h)
    for (int v = 0; v < NV; ++v) store(out + h * D + v * W, load(w.sums.data() + h * D + v * W) * inv[h]);
}

template <int NV16, typename T>
static void decode_all(const T* q, int64_t qs, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
                       T* out, int64_t B, int64_t H, int64_t Hkv, int64_t bs, int64_t max_blocks, int64_t block_stride,
                       int64_t token_stride, float scale) {
  constexpr int NV = NV16 * 2;
  constexpr int64_t D = NV * W;
  const int64_t G = H / Hkv;
  int gh = 1;                     // heads per group: a power of two dividing G whose sums fit in registers
  while (gh < W && G % (2 * gh) == 0 && 2 * gh * NV <= 16) gh *= 2;
  // Each thread takes a run of sequences with about an equal share of the cached rows (the contexts of one
  // batch differ tenfold, so equal counts of sequences would leave threads idle).
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  std::vector<int64_t> first(parts + 1, B);
  first[0] = 0;
  int64_t total = 0, seen = 0;
  for (int64_t b = 0; b < B; ++b) total += lens[b];
  for (int64_t b = 0, p = 1; b < B && p < parts; ++b) {
    seen += lens[b];
    while (p < parts && seen * parts >= total * p) first[p++] = b + 1;
  }
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    Scratch w;
    for (int64_t b = first[part_begin]; b < first[part_end]; ++b) {
      const T* qb = q + b * qs;
      T* ob = out + b * H * D;
      const int64_t* table = tables + b * max_blocks;
#define TANDEM_SEQ(GH) decode_seq<GH, NV, T>(qb, kc, vc, table, lens[b], ob, H, Hkv, bs, block_stride, token_stride, scale, w)
      switch (gh) {
        case 1: TANDEM_SEQ(1); break;
        case 2: if constexpr (2 * NV <= 16) TANDEM_SEQ(2); break;
        case 4: if constexpr (4 * NV <= 16) TANDEM_SEQ(4); break;
        case 8: if constexpr (8 * NV <= 16) TANDEM_SEQ(8); break;
      }
#undef TANDEM_SEQ
    }
  });
}

// q [B, H, D] with rows [H, D] contiguous (a view of the q|k|v product is fine);
// k_cache, v_cache [num_blocks, block_size, Hkv, D] (last two dims contiguous);
// block_tables [B, max_blocks] int64; context_lens [B] int64 (>= 1); D a multiple of 16, at most 128.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [B, H, D], rows contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides(), "caches must be [N, bs, Hkv, D] alike");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3), "cache rows must be contiguous");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && block_tables.is_contiguous(), "block_tables: int64 [B, M]");
  TORCH_CHECK(context_lens.dtype() == torch::kInt64 && context_lens.is_contiguous(), "context_lens: int64 [B]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes differ");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2), bs = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "head counts / head_dim do not match the cache");
  TORCH_CHECK(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  auto out = torch::empty({B, H, D}, q.options());
  const float s = static_cast<float>(scale);
#define TANDEM_DECODE(NV)                                                                                       \
  case NV:                                                                                                      \
    if (q.scalar_type() == torch::kFloat32)                                                                     \
      decode_all<NV, float>(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(),                        \
                            v_cache.data_ptr<float>(), block_tables.data_ptr<int64_t>(),                        \
                            context_lens.data_ptr<int64_t>(),                                                   \
                            out.data_ptr<float>(), B, H, Hkv, bs, block_tables.size(1), k_cache.stride(0),      \
                            k_cache.stride(1), s);                                                              \
    else                                                                                                        \
      decode_all<NV, c10::BFloat16>(q.data_ptr<c10::BFloat16>(), q.stride(0),                                   \
                                    k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),        \
                                    block_tables.data_ptr<int64_t>(),                                            \
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

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t]: the new tokens' keys and values into their cache slots.
// k, v [T, Hkv, D] with rows [Hkv, D] contiguous (views of the q|k|v product are fine); caches as above.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "k and v must be [T, Hkv, D] alike");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v rows must be [Hkv, D] contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1 &&
              k_cache.stride(2) == k_cache.size(3) && k_cache.stride(0) == k_cache.size(1) * k_cache.stride(1) &&
              k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "caches must be [N, bs, Hkv, D] rows");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "dtypes differ");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.is_contiguous() && slots.numel() == k.size(0),
              "slots: int64 [T]");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t bytes = row * k.element_size(), ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  const int64_t cs = k_cache.stride(1) * k_cache.element_size();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " out of the cache");
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(kc + slot[t] * cs, kp + t * ks, bytes);
    std::memcpy(vc + slot[t] * cs, vp + t * vs, bytes);
  }
}
"""
FUNCTIONS = ("paged_decode", "write_kv")

ENABLED = os.environ.get("TANDEM_PAGED_KERNEL", "1") != "0"   # benchmarks flip it to time the PyTorch path
HEAD_DIMS = tuple(range(16, 129, 16))   # the kernel's head sizes: whole 16-lane vectors, up to 128


def available(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """True when the kernel serves this device/dtype/head size (loading, on a first start compiling, it once)."""
    if not ENABLED or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return False
    return cpu_extension.load() is not None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into their cache slots: one C++ pass where the kernel serves these tensors, else
    two index_copy_ calls (each of which costs ~20 us of dispatch on CPU, twice per layer and step)."""
    if ENABLED and k.device.type == "cpu" and k.dtype in (torch.float32, torch.bfloat16) and \
            cpu_extension.rows_contiguous(k, v) and k_cache.is_contiguous() and cpu_extension.load() is not None:
        cpu_extension.load().write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D], attending each row to its first context_lens[b] cached positions."""
    if not cpu_extension.rows_contiguous(q):
        q = q.contiguous()
    return cpu_extension.load().paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
