"""Sampling (greedy, temperature, top-k, top-p, seeds, min_new_tokens, raw logprobs), request
validation, and incremental detokenization with stop strings on the real tokenizers."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import InvalidRequest
from serving.engine.detokenizer import IncrementalDetokenizer, fast_decode
from serving.engine.sampler import Sampler, draw
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

VOCAB = 300


def seq_with(params: SamplingParams, seed: int = 0, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", [1, 2, 3], params, torch.Generator().manual_seed(seed), 512, 16)


def logits_rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_take_the_argmax_with_raw_logprobs():
    logits = logits_rows(5, 0)
    greedy = [seq_with(SamplingParams(temperature=0)) for _ in range(5)]
    tokens, logprobs, _ = Sampler([2])(logits, greedy)
    assert tokens == logits.argmax(-1).tolist()
    topk1 = [seq_with(SamplingParams(temperature=0.7, top_k=1), seed=i) for i in range(5)]
    assert Sampler([2])(logits, topk1)[0] == tokens
    raw = torch.log_softmax(logits, -1)
    assert logprobs == pytest.approx([raw[i, t].item() for i, t in enumerate(tokens)])


def test_seeded_rows_are_reproducible_whatever_the_batch_companions():
    logits = logits_rows(6, 1)
    sampler = Sampler([2])
    params = SamplingParams(temperature=1.3, top_p=0.95, top_k=50, seed=123)

    def draw(batch_logits: torch.Tensor, row: int, companions: list[Sequence], steps: int = 20) -> list[int]:
        me = seq_with(params, seed=123)
        seqs = companions[:row] + [me] + companions[row:]
        return [sampler(batch_logits, seqs)[0][row] for _ in range(steps)]

    alone = draw(logits[2:3], 0, [])
    others = [seq_with(SamplingParams(temperature=0.9), seed=7 + i, seq_id=i + 1) for i in range(5)]
    crowded = draw(logits, 2, others)
    assert alone == crowded
    assert len(set(alone)) > 1, "temperature sampling should not be constant over 20 draws"
    different_seed = [sampler(logits[2:3], [seq_with(params, seed=124)])[0][0] for _ in range(20)]
    assert different_seed != alone


def test_batched_draw_follows_each_rows_softmax_and_never_draws_a_masked_token():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5)) * 1.5
    logits[1, ::2] = float("-inf")                     # row 1: only odd tokens, the last one masked too
    logits[1, 19] = float("-inf")
    logits[2] = float("-inf")
    logits[2, 0] = 0.0                                 # row 2: one token left
    gens = [torch.Generator().manual_seed(40 + i) for i in range(3)]
    counts = torch.zeros(3, 20)
    for _ in range(20000):
        counts[torch.arange(3), draw(logits, gens)] += 1
    freq = counts / counts.sum(1, keepdim=True)
    expected = torch.softmax(logits, -1)
    assert (counts[expected == 0] == 0).all()
    total_variation = 0.5 * (freq - expected).abs().sum(1)
    assert (total_variation < 0.02).all(), total_variation


def test_top_k_and_top_p_restrict_the_support_but_logprobs_stay_raw():
    logits = logits_rows(1, 2)
    order = logits[0].argsort(descending=True).tolist()
    raw = torch.log_softmax(logits[0], -1)
    seq = seq_with(SamplingParams(temperature=5.0, top_k=3), seed=0)
    seen = set()
    for _ in range(200):
        tokens, logprobs, _ = Sampler([])(logits, [seq])
        seen.add(tokens[0])
        assert logprobs[0] == pytest.approx(raw[tokens[0]].item())
    assert seen == set(order[:3])
    probs = torch.softmax(logits[0], -1)
    top_mass = probs[order[0]].item()
    seq = seq_with(SamplingParams(temperature=1.0, top_p=top_mass * 0.99), seed=0)
    assert {Sampler([])(logits, [seq])[0][0] for _ in range(50)} == {order[0]}


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 50.0        # EOS is by far the most likely
    logits[0, 9] = 40.0        # then a stop id
    logits[0, 11] = 30.0
    params = SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[9])
    seq = seq_with(params)
    assert Sampler([2])(logits, [seq])[0] == [11]
    seq.append_token(11, 0.0)
    seq.append_token(11, 0.0)
    assert Sampler([2])(logits, [seq])[0] == [2]
    seq = seq_with(SamplingParams(temperature=0, min_new_tokens=2, ignore_eos=True))
    assert Sampler([2])(logits, [seq])[0] == [2], "ignore_eos: EOS is an ordinary token, not masked"


def test_each_row_of_a_mixed_batch_reports_its_own_logprobs_mode():
    logits = logits_rows(3, 3)
    raw = torch.log_softmax(logits, -1)
    seqs = [seq_with(SamplingParams(temperature=0.7, top_k=3, seed=1, top_logprobs=5, logprobs_mode=mode), seq_id=i)
            for i, mode in enumerate(("processed", "raw"))]
    seqs.append(seq_with(SamplingParams(temperature=0, top_logprobs=5, logprobs_mode="processed"), seq_id=2))
    tokens, logprobs, top = Sampler([])(logits, seqs)
    kept = torch.log_softmax(logits[0] / 0.7, -1)[logits[0].topk(3).indices]
    kept = kept - torch.logsumexp(kept, 0)
    assert [t for t, _ in top[0]] == logits[0].topk(3).indices.tolist()       # only the 3 kept tokens
    assert [v for _, v in top[0]] == pytest.approx(kept.tolist(), abs=1e-5)
    assert logprobs[0] == pytest.approx(dict(top[0])[tokens[0]], abs=1e-6)
    assert sum(math.exp(v) for _, v in top[0]) == pytest.approx(1.0, abs=1e-5)
    assert logprobs[1] == pytest.approx(raw[1, tokens[1]].item()) and len(top[1]) == 5
    assert logprobs[2] == pytest.approx(raw[2].max().item()) and [t for t, _ in top[2]] == raw[2].topk(5).indices.tolist()


@pytest.mark.parametrize("field, kwargs", [
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=math.inf)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-1)),
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("min_new_tokens", dict(min_new_tokens=-1)),
    ("min_new_tokens", dict(min_new_tokens=9, max_new_tokens=8)),
    ("stop", dict(stop=[""])),
    ("stop_token_ids", dict(stop_token_ids=[-3])),
    ("seed", dict(seed=-1)),
    ("logprobs_mode", dict(logprobs_mode="processed_logprobs")),
])
def test_validation_names_the_field(field, kwargs):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs).validate()
    assert err.value.field == field
    SamplingParams().validate()


# ------------------------------------------------------------ detokenizer (real tokenizers)

def stream(tokenizer, prompt_ids: list[int], ids: list[int], stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop)
    deltas = []
    for i, t in enumerate(ids):
        detok.add_tokens([t])
        last = detok.stopped or i == len(ids) - 1
        if last and not detok.stopped:
            detok.flush()
        deltas.append(detok.take_delta(last))
        if detok.stopped:
            break
    return deltas, detok


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path)


@pytest.fixture(scope="module")
def story_tok(tinystories_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tinystories_path)


def test_incremental_text_equals_full_decode_with_multibyte_characters(gpt2_tok, story_tok):
    text = " Héllo wörld — 你好, 🙂 emoji and naïve café! Done."
    for tok in (gpt2_tok, story_tok):
        prompt = tok.encode("Say:")
        ids = tok.encode(text, add_special_tokens=False)
        deltas, detok = stream(tok, prompt, ids, [])
        assert "".join(deltas) == detok.text
        assert all("\ufffd" not in d for d in deltas), deltas
        full = tok.decode(prompt + ids, skip_special_tokens=True)
        assert full.endswith(detok.text)
        assert detok.text.strip() == tok.decode(ids, skip_special_tokens=True).strip()
    assert detok.text.strip() == tok.decode(ids).strip()
    deltas, detok = stream(gpt2_tok, gpt2_tok.encode("Say:"), gpt2_tok.encode(text), [])
    assert detok.text == text                          # byte-level BPE round-trips every character


def test_fast_decode_returns_the_tokenizers_own_text(gpt2_tok, story_tok):
    import random

    rng = random.Random(0)
    for tok in (gpt2_tok, story_tok):
        decode = fast_decode(tok)
        specials = list(tok.all_special_ids)
        for _ in range(200):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))] + rng.sample(specials, k=min(1, len(specials)))
            rng.shuffle(ids)
            for skip in (True, False):
                assert decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), ids


def test_multi_token_stop_string_cuts_the_text_and_never_leaks(gpt2_tok, story_tok):
    text = " The cat sat on the mat. THE END and then more words follow here."
    for tok in (gpt2_tok, story_tok):
        ids = tok.encode(text, add_special_tokens=False)
        deltas, detok = stream(tok, tok.encode("Story:"), ids, ["THE END", "zebra"])
        assert detok.stopped
        assert detok.text == " The cat sat on the mat. " or detok.text == "The cat sat on the mat. "
        assert "".join(deltas) == detok.text
        assert not any("THE" in d for d in deltas)
        # a stop prefix that never completes is released at the end
        deltas, detok = stream(tok, tok.encode("Story:"), tok.encode(" so THE E", add_special_tokens=False),
                               ["THE END"])
        assert not detok.stopped and "".join(deltas).endswith("THE E")
