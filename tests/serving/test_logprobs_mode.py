"""logprobs_mode on the real engine (TinyStories-656K): "processed" logprobs are those of the distribution the
token was drawn from (temperature, top-k, top-p), checked against an independent computation from HF's logits
of the same checkpoint; "raw" is unchanged; greedy rows and min_new_tokens follow the documented definition."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams

PROMPTS = ["Once upon a time, there was a little", "Tom had a toy car. He", "The sun was hot and"]
TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tinystories_path):
    return LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", dtype="float32", token_budget=64))


@pytest.fixture(scope="module")
def hf(tinystories_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tinystories_path), dtype=torch.float32).eval()


def hf_logits(hf, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """HF's logits of each generated position: [len(token_ids), V] (row j predicts token_ids[j])."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].double()
    return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(token_ids)]


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The processed distribution written out by hand, in float64: {token id: log p} over the kept tokens only."""
    scaled = [x / temperature for x in logits.tolist()]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    kept = order[:top_k] if top_k else order
    if top_p < 1.0:
        top = max(scaled[t] for t in kept)
        z = sum(math.exp(scaled[t] - top) for t in kept)
        mass, nucleus = 0.0, []
        for t in kept:                      # keep tokens while the mass before them is below top_p
            if mass >= top_p:
                break
            nucleus.append(t)
            mass += math.exp(scaled[t] - top) / z
        kept = nucleus
    top = max(scaled[t] for t in kept)
    log_z = top + math.log(sum(math.exp(scaled[t] - top) for t in kept))
    return {t: scaled[t] - log_z for t in kept}


def run(engine: LLMEngine, **params):
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=21, **params))


@pytest.mark.parametrize("knobs", [dict(top_k=5), dict(top_p=0.6), dict(top_k=8, top_p=0.8)],
                         ids=["top_k=5", "top_p=0.6", "top_k=8,top_p=0.8"])
def test_processed_logprobs_are_those_of_the_distribution_sampled(engine, hf, knobs):
    top_k, top_p = knobs.get("top_k", 0), knobs.get("top_p", 1.0)
    processed = run(engine, temperature=0.7, logprobs_mode="processed", top_logprobs=20, **knobs)
    raw = run(engine, temperature=0.7, top_logprobs=20, **knobs)
    checked = complete = 0
    for out, raw_out in zip(processed, raw):
        assert out.token_ids == raw_out.token_ids          # the mode changes what is reported, not what is drawn
        logits = hf_logits(hf, out.prompt_token_ids, out.token_ids)
        for j, (token, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
            expected = reference_distribution(logits[j], 0.7, top_k, top_p)
            assert token in expected, "a token outside the kept set was sampled"
            assert abs(lp - expected[token]) < TOL, (j, lp, expected[token])
            best = sorted(expected.items(), key=lambda kv: -kv[1])[:20]
            assert [t for t, _ in top] == [t for t, _ in best]     # the top list is the kept set, best first
            for (_, got), (_, want) in zip(top, best):
                assert abs(got - want) < TOL
            if len(top) < 20:                                    # the whole kept set is listed: it sums to 1
                assert abs(sum(math.exp(v) for _, v in top) - 1.0) < TOL
                complete += 1
            raw_logp = torch.log_softmax(logits[j], -1)
            assert abs(raw_out.logprobs[j] - raw_logp[token].item()) < TOL     # raw mode: as before
            assert [t for t, _ in raw_out.top_logprobs[j]] == raw_logp.topk(20).indices.tolist()
            checked += 1
    assert checked >= 30 and complete >= 10
    assert max(abs(a - b) for o, r in zip(processed, raw) for a, b in zip(o.logprobs, r.logprobs)) > 0.05


def test_greedy_rows_report_the_logits_the_argmax_is_taken_over(engine, hf):
    """Greedy: processed = raw (temperature 1, top-k/top-p ignored), except while min_new_tokens masks EOS and
    stop ids: then it is the masked logits' log_softmax."""
    greedy = run(engine, temperature=0, top_k=3, logprobs_mode="processed")
    plain = run(engine, temperature=0)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in plain]
    assert [lp for o in greedy for lp in o.logprobs] == pytest.approx([lp for o in plain for lp in o.logprobs], abs=1e-6)
    # the most likely next token made a stop id: min_new_tokens masks it (and EOS) for the first 4 tokens
    prompt = engine.encode("Once upon a time")
    with torch.no_grad():
        favourite = int(hf(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    masked_ids = [favourite, *engine.info.eos_token_ids]
    [out] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, min_new_tokens=4,
                                                     stop_token_ids=[favourite], logprobs_mode="processed",
                                                     top_logprobs=20))
    [raw] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, min_new_tokens=4,
                                                     stop_token_ids=[favourite], top_logprobs=20))
    assert out.token_ids == raw.token_ids and out.token_ids[0] != favourite
    logits = hf_logits(hf, out.prompt_token_ids, out.token_ids)
    for j, (token, lp, top) in enumerate(zip(out.token_ids[:4], out.logprobs, out.top_logprobs)):
        row = logits[j].clone()
        row[masked_ids] = float("-inf")
        assert abs(lp - torch.log_softmax(row, -1)[token].item()) < TOL
        assert not set(masked_ids) & {t for t, _ in top}
        assert abs(raw.logprobs[j] - torch.log_softmax(logits[j], -1)[token].item()) < TOL
    assert out.logprobs[0] - raw.logprobs[0] > 0.01          # renormalised without the favourite


def test_bad_mode_is_refused_naming_the_field(engine):
    from common.errors import InvalidRequest

    for bad in ("softmax", "", None, 1):
        with pytest.raises(InvalidRequest) as err:
            engine.add_request("bad", "Once", SamplingParams(logprobs_mode=bad))
        assert err.value.field == "logprobs_mode"
    assert not engine.has_unfinished_requests()
