"""How one request is sampled: a dataclass validated once when the request arrives."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from common.errors import InvalidRequest

# Temperatures below this sample greedily: logits / 1e-5 stays finite in fp32 for any logit below 3e33, while
# smaller temperatures (1e-40 is a float32 denormal) overflow the division and leave softmax with NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20
LOGPROBS_MODES = ("raw", "processed")   # serving.engine.sampler says what each one is


@dataclass
class SamplingParams:
    """Sampling options of one request. Field names equal the proto's, so errors name them."""

    temperature: float = 1.0          # 0 (or anything below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0                # nucleus mass kept, in (0, 1]
    top_k: int = 0                    # 0 = off
    seed: int | None = None           # own generator: reproducible regardless of batch companions
    max_new_tokens: int = 128
    min_new_tokens: int = 0           # EOS and stop ids are masked until this many tokens exist
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)   # multi-token stop strings (text cut before them)
    top_logprobs: int = 0             # also report this many most likely tokens per position (0..20)
    priority: int = 0                 # admission order: lower first, FCFS among equals
    logprobs_mode: str = "raw"        # logprobs (and top_logprobs) of the raw model distribution, or "processed":
                                      # of the one sampled from (temperature, top-k, top-p applied)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self) -> SamplingParams:
        """Raise InvalidRequest naming the first bad field; return self."""
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InvalidRequest("temperature", f"must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {p!r}")
        _int_at_least("top_k", self.top_k, 0)
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _int_at_least("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequest("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens}), "
                                                   f"got {self.min_new_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        for token_id in self.stop_token_ids:
            _int_at_least("stop_token_ids", token_id, 0)
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise InvalidRequest("stop", f"stop strings must be non-empty strings, got {text!r}")
        _int_at_least("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest("top_logprobs", f"must be <= {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise InvalidRequest("priority", f"must be an integer, got {self.priority!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise InvalidRequest("logprobs_mode", f"must be one of {', '.join(LOGPROBS_MODES)}, "
                                                  f"got {self.logprobs_mode!r:.40}")
        return self


def per_sample(params: SamplingParams, n: int, num_prompts: int) -> SamplingParams | list[SamplingParams]:
    """Params of n samples of each of `num_prompts` prompts (engine order: prompt-major). With a seed, sample
    j is seeded with seed + j, so the n completions differ yet replay exactly; else one shared object."""
    if n == 1 or params.seed is None:
        return params
    samples = [replace(params, seed=(params.seed + j) % (1 << 63)) for j in range(n)]
    return [samples[j] for _ in range(num_prompts) for j in range(n)]


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidRequest(name, f"must be an integer >= {low}, got {value!r}")
