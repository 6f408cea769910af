"""tandem's CPU kernels, built as ONE C++ extension: compiled once per CPU at first use, then cached.

The kernels live beside the Python code that calls them (serving/layers/paged_kernel.py: decode attention
over the paged cache; serving/layers/fused_kernels.py: SiLU-and-multiply, RoPE and RMSNorm in one pass
each; serving/layers/greedy_kernel.py: greedy decoding's argmax and logprob).
`load()` concatenates this module's HEADER (8-lane vector helpers, written with the GCC/Clang vector
extensions: one AVX2 register, a NEON pair, half an AVX-512 register, the same code everywhere) with
their sources and builds them with torch.utils.cpp_extension.load_inline: g++ -O3 -march=native, about
a minute, logged. The build is cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)
under a name that hashes this CPU's model and flags and the source itself, so later starts load it in
well under a second and an edited kernel is rebuilt. Without a compiler, or with TANDEM_CPU_KERNELS=0,
`load()` returns None (once, with a warning) and every caller keeps its pure-PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

// 8-lane vectors (GCC/Clang vector extensions): one AVX2 register, half an AVX-512 one. Not wider: GCC splits
// a 16-lane vector into AVX2 halves well enough for arithmetic, but its compares, selects and integer
// conversions then go through the stack (measured on Zen 3: a 16-lane exp made silu_mul 4x slower than
// torch's two passes), and one width means an AVX-512 machine runs exactly the code tested on AVX2.
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
constexpr int W = 8;

static inline vf splat(float x) { return vf{} + x; }
static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// bf16 <-> fp32 spelled with AVX2 / AVX-512 intrinsics where the CPU has them: GCC lowers the vector-extension
// widening of 8 uint16 to 4 instructions (two half-width zero-extends and an insert) where one vpmovzxwd
// does it, and the narrowing to a two-table word permute where one vpmovdw does; the bits are the same.
#if defined(__AVX2__)
#include <immintrin.h>
#endif
static inline vf load(const c10::BFloat16* p) {      // bf16 -> fp32: the 16 bits become the high half
#if defined(__AVX2__)
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  vf v; std::memcpy(&v, &w, sizeof v); return v;
#else
  vh h; std::memcpy(&h, p, sizeof h);
  vu w = __builtin_convertvector(h, vu) << 16;
  vf v; std::memcpy(&v, &w, sizeof v); return v;
#endif
}
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// fp32 -> bf16, round to nearest even as c10::BFloat16 does (NaN stays a quiet NaN), W lanes at once.
static inline void store(c10::BFloat16* p, vf v) {
  vu bits; std::memcpy(&bits, &v, sizeof bits);
  const vu rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
  const vu out = v != v ? vu{} + 0x7fc0u : rounded;
#if defined(__AVX512VL__) && defined(__AVX512F__)
  __m256i o; std::memcpy(&o, &out, sizeof o);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtepi32_epi16(o));
#else
  const vh h = __builtin_convertvector(out, vh);
  std::memcpy(p, &h, sizeof h);
#endif
}

// Lane permutations of one or two vectors, spelled per compiler (both lower them to shuffle instructions).
#if defined(__clang__)
#define TANDEM_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define TANDEM_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TANDEM_SHUFFLE(v, ...) __builtin_shuffle(v, vi{__VA_ARGS__})
#define TANDEM_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif
static inline float hsum(vf v) {
  v += TANDEM_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += TANDEM_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += TANDEM_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}
// Pairwise sums within each 4-lane half, as x86's hadd: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7].
static inline vf hadd(vf a, vf b) {
  return TANDEM_SHUFFLE2(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + TANDEM_SHUFFLE2(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The W horizontal sums of a[0 .. W-1] as one vector (lane j = hsum(a[j])): 7 hadds and one cross-half add
// for 8 sums, where 8 hsums take 24 shuffles and 24 adds.
static inline vf hsums(const vf* a) {
  const vf lo = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));   // lanes 0-3: a0..a3 low halves, 4-7: high halves
  const vf hi = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return TANDEM_SHUFFLE2(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + TANDEM_SHUFFLE2(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2,
// p the degree-7 Taylor polynomial (relative error < 1e-8 there); exactly 0 below -87.
static inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);   // round(x / ln2) for x <= 0
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723212e-6f;
  vf p = splat(1.f / 5040);
  p = p * r + 1.f / 720; p = p * r + 1.f / 120; p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;   p = p * r + 0.5f;      p = p * r + 1.f;     p = p * r + 1.f;
  const vu bits = (vu)((n + 127) << 23);
  vf scale; std::memcpy(&scale, &bits, sizeof scale);
  return under ? splat(0.f) : p * scale;
}

"""

_lock = threading.Lock()
_module = None
_failed = False


def rows_contiguous(*tensors) -> bool:
    """Each [T, H, D] tensor's [H, D] rows are contiguous, the layout the kernels read (any row stride, so
    the views of one fused q|k|v product qualify)."""
    return all(t.stride(-1) == 1 and t.stride(1) == t.shape[2] for t in tensors)


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (a -march=native build runs only where it was built)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        info = platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


def _sources() -> tuple[str, list[str]]:
    from serving.layers import fused_kernels, greedy_kernel, paged_kernel

    parts = (paged_kernel, fused_kernels, greedy_kernel)
    return HEADER + "".join(p.SOURCE for p in parts), [f for p in parts for f in p.FUNCTIONS]


def load():
    """The compiled extension module, or None where it cannot be built (then PyTorch paths are used)."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
            _failed = True
            return None
        from torch.utils.cpp_extension import load_inline

        source, functions = _sources()
        name = f"tandem_cpu_kernels_{_cpu_tag()}_{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        started = time.perf_counter()
        log.info("loading tandem's CPU kernels (the first start compiles them with g++, ~1 min; cached)")
        try:
            _module = load_inline(name=name, cpp_sources=[source], functions=functions,
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers...: keep the PyTorch paths
            _failed = True
            log.warning("CPU kernels unavailable (%s: %s); using the PyTorch paths",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        log.info("CPU kernels ready in %.1f s", time.perf_counter() - started)
        return _module
