"""Request isolation inside one engine step: what one request's numbers can break stays with that request.

The forward pass is the engine's own work: if it fails, the engine fails (the loop turns health
NOT_SERVING). Everything after it is per request: a row of logits that is not usable (NaN, +inf, or no
finite entry), a sampling error, a row whose allowed set is empty (every token the model allows is a
stop or EOS id while the request is below `min_new_tokens`), or a failure while detokenizing or matching
stop strings ends that request only, with finish reason "abort" and an `error` saying why, and every
other request of the step goes on.
"""

from __future__ import annotations

import logging

import torch

from common.errors import InvalidRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

log = logging.getLogger(__name__)


def banned_while_short(params: SamplingParams, eos_token_ids: list[int]) -> set[int]:
    """Token ids masked while a request is below min_new_tokens (the sampler's rule)."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


def check_allowed_set(params: SamplingParams, eos_token_ids: list[int], vocab_size: int) -> None:
    """Refuse at admission a request that could never sample a token: with min_new_tokens > 0 and every id
    of the vocabulary a stop or EOS id, the masked row is all -inf."""
    if params.min_new_tokens <= 0:
        return
    banned = {t for t in banned_while_short(params, eos_token_ids) if 0 <= t < vocab_size}
    if len(banned) >= vocab_size:
        raise InvalidRequest("stop_token_ids", f"with min_new_tokens={params.min_new_tokens}, every token of the "
                                               f"vocabulary ({vocab_size}) is a stop or EOS id: nothing can be sampled")


def row_problem(row: torch.Tensor, seq: Sequence, eos_token_ids: list[int]) -> str | None:
    """Why this row of fp32 logits cannot be sampled for `seq` (None when it can)."""
    if bool(torch.isnan(row).any()):
        return f"non-finite logits ({int(torch.isnan(row).sum())} NaN) at output token {seq.num_output_tokens}"
    if bool(torch.isposinf(row).any()):
        return f"non-finite logits (+inf) at output token {seq.num_output_tokens}"
    allowed = torch.isfinite(row)
    if seq.num_output_tokens < seq.params.min_new_tokens:
        banned = [t for t in banned_while_short(seq.params, eos_token_ids) if 0 <= t < row.shape[-1]]
        if banned:
            allowed = allowed.clone()
            allowed[banned] = False
    if not bool(allowed.any()):
        return f"no token can be sampled at output token {seq.num_output_tokens}: every finite logit is masked"
    return None


def sample_isolated(sampler, logits: torch.Tensor, seqs: list[Sequence]
                    ) -> tuple[list[int | None], list[float | None], list[list[tuple[int, float]]], dict[int, str]]:
    """Sample every usable row; return (tokens, logprobs, top logprobs, {row: why it failed}). Failed rows get
    None (and [] top logprobs, as rows that did not ask for them).

    The fast path is one batched sampler call; only when it raises are the rows sampled one by one, so
    a failure is pinned on its own request."""
    logits = logits.float()
    n = len(seqs)
    failed: dict[int, str] = {}
    # a row's sum is finite unless the row holds a NaN or an inf (or a finite sum overflows, which only sends
    # that row through the exact check below): one pass over the logits instead of four
    bad_rows = ~torch.isfinite(logits.sum(dim=-1))
    if seqs and (bool(bad_rows.any()) or any(s.num_output_tokens < s.params.min_new_tokens for s in seqs)):
        for i, seq in enumerate(seqs):
            if bool(bad_rows[i]) or seq.num_output_tokens < seq.params.min_new_tokens:
                why = row_problem(logits[i], seq, sampler.eos_token_ids)
                if why is not None:
                    failed[i] = why
    good = [i for i in range(n) if i not in failed]
    tokens: list[int | None] = [None] * n
    logprobs: list[float | None] = [None] * n
    tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    if not good:
        return tokens, logprobs, tops, failed
    try:
        rows = logits if len(good) == n else logits[good]
        got_t, got_lp, got_top = sampler(rows, [seqs[i] for i in good])
        for j, (i, t, lp) in enumerate(zip(good, got_t, got_lp)):
            tokens[i], logprobs[i] = t, lp
            if got_top is not None:
                tops[i] = got_top[j]
    except Exception:  # noqa: BLE001 - find the request that caused it; the others are sampled alone
        for i in good:
            try:
                (t,), (lp,), top = sampler(logits[i:i + 1], [seqs[i]])
                tokens[i], logprobs[i] = t, lp
                if top is not None:
                    tops[i] = top[0]
            except Exception as err:  # noqa: BLE001 - this request ends, the step goes on
                log.warning("request %s: sampling failed: %s: %s", seqs[i].request_id, type(err).__name__, err)
                failed[i] = f"sampling failed: {type(err).__name__}: {err}"
    return tokens, logprobs, tops, failed
