"""Greedy decoding's pick in one C++ kernel: each row's argmax and that token's log-softmax probability.

The greedy rows of a step need torch.argmax (not vectorised on CPU: 141 us for 64 rows of 2048) and
the log_softmax row gathered at the chosen token (170 us more, for a full [B, V] result that is read
once). `greedy_pick(logits)` does both in two passes over each row: the maximum, then the first index
holding it (torch.argmax's choice) and sum(exp(x - max)), so the logprob is -log(sum) (log_softmax's
formula at its maximum; the exp is the kernels' vectorised one, so the last bits can differ).

It serves contiguous fp32 CPU rows; -inf entries (masked tokens) are fine. A batch with a NaN, a +inf
or a row of only -inf is left to the PyTorch path (`None`): torch.argmax picks a NaN, and an infinite
maximum has no finite log-softmax. Without the
compiled kernels, on another device or with TANDEM_GREEDY_KERNEL=0 it returns None too.
"""

from __future__ import annotations

import os

import torch

from serving.layers import cpu_extension

SOURCE = r"""
// tokens[b] = the first index of row b's maximum; logprobs[b] = -log(sum_j exp(x_bj - max_b)).
// false when some row holds a NaN, a +inf or only -inf (the caller falls back to torch).
static bool greedy_rows(const float* x, int64_t B, int64_t V, int64_t* tokens, float* logprobs) {
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x + b * V;
    vf m = splat(-INFINITY);
    vi nan{};
    int64_t i = 0;
    for (; i + W <= V; i += W) {
      const vf v = load(r + i);
      m = m > v ? m : v;
      nan |= v != v;
    }
    float mx = hmax(m);
    bool any_nan = false;
    for (int j = 0; j < W; ++j) any_nan |= nan[j] != 0;
    for (; i < V; ++i) { mx = std::max(mx, r[i]); any_nan |= r[i] != r[i]; }
    if (any_nan || !std::isfinite(mx)) return false;   // +inf maximum, or every entry -inf
    int64_t first = -1;
    vf total{};
    for (i = 0; i + W <= V; i += W) {
      const vf v = load(r + i);
      total += exp_nonpositive(v - mx);
      if (first < 0)
        for (int j = 0; j < W; ++j)
          if (v[j] == mx) { first = i + j; break; }
    }
    float sum = hsum(total);
    for (; i < V; ++i) {
      sum += std::exp(r[i] - mx);
      if (first < 0 && r[i] == mx) first = i;
    }
    tokens[b] = first;
    logprobs[b] = -std::log(sum);
  }
  return true;
}

std::vector<torch::Tensor> greedy_pick(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32,
              "logits must be contiguous float32 [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "empty rows");
  auto tokens = torch::empty({B}, logits.options().dtype(torch::kInt64));
  auto logprobs = torch::empty({B}, logits.options());
  if (!greedy_rows(logits.data_ptr<float>(), B, V, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>()))
    return {};
  return {tokens, logprobs};
}
"""
FUNCTIONS = ("greedy_pick",)

ENABLED = os.environ.get("TANDEM_GREEDY_KERNEL", "1") != "0"


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(argmax [B], log_softmax at it [B]) of fp32 rows [B, V], or None where the kernel does not serve them."""
    if not (ENABLED and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[0] > 0 and logits.shape[1] > 0 and logits.is_contiguous()):
        return None
    ext = cpu_extension.load()
    if ext is None:
        return None
    got = ext.greedy_pick(logits)
    return (got[0], got[1]) if got else None
