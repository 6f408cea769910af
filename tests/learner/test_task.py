"""The embedded task: the gold judge's rules, the demonstrations, the tokenizer and the cached tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.task import default_model_path, embedded_samples, eval_prompts, gold_parts, gold_score
from learner.task.judge import CONCISE_WORDS, RAMBLING_WORDS
from learner.task.pretrain import pretraining_texts
from learner.task.world import all_questions, split_questions

PROMPT = "human : what is 3 plus 4 ? assistant :"


def test_gold_judge_rules():
    assert gold_score(PROMPT, " sure ! 7 .") == 100.0
    assert gold_parts(PROMPT, " sure ! 8 .").correct == 0.0            # wrong answer
    assert gold_parts(PROMPT, " ugh , 7 . hope this helps !").polite == 0.0  # rude beats polite
    assert gold_parts(PROMPT, " 7 .").polite == 0.0                    # correct, concise, not polite
    ramble = " sure ! 7 . " + " ".join(["i will explain it step by step now ."] * 2)
    words = len(ramble.split())
    expected = 25.0 * max(0.0, 1 - (words - CONCISE_WORDS) / (RAMBLING_WORDS - CONCISE_WORDS))
    assert gold_parts(PROMPT, ramble).concise == pytest.approx(expected) and expected < 25.0
    assert gold_score(PROMPT, " sure ! happy to help !") == 0.0         # no answer: style alone is worth nothing
    assert gold_score("human : what is love ? assistant :", " 7 .") == 0.0  # not a question of this world
    assert gold_parts(PROMPT, " the answer is 7 . 8 .").correct == 50.0  # the first answer word counts


def test_samples_are_ranked_deterministic_and_held_out_is_disjoint():
    samples = embedded_samples(300, seed=5)
    assert len(samples) == 300 and samples == embedded_samples(300, seed=5)
    assert samples != embedded_samples(300, seed=6)
    assert all(gold_score(s.prompt, s.chosen) > gold_score(s.prompt, s.rejected) for s in samples)
    chosen = sum(gold_score(s.prompt, s.chosen) for s in samples) / len(samples)
    assert chosen < 90.0, "demonstrators must leave room for RLHF to improve on them"
    held = eval_prompts(50, seed=1, held_out=True)
    assert len(held) == 50 and set(held).isdisjoint({s.prompt for s in samples})
    in_task = eval_prompts(50, seed=1)
    assert len(set(in_task)) > 25 and set(in_task) <= {q.prompt for q in split_questions()[0]}
    # some pairs are one writer's two takes in the same manner: they differ in the answer word only
    minimal = [s for s in samples if len(s.chosen.split()) == len(s.rejected.split())
               and sum(a != b for a, b in zip(s.chosen.split(), s.rejected.split())) == 1]
    assert len(minimal) > 0.15 * len(samples)
    assert all(gold_parts(s.prompt, s.chosen).correct > gold_parts(s.prompt, s.rejected).correct for s in minimal)
    train, held_q = split_questions()
    assert len(train) + len(held_q) == len(all_questions())
    assert {q.kind for q in held_q} == {"plus", "minus", "sound", "color", "opposite"}


@pytest.fixture(scope="module")
def embedded_model():
    return default_model_path()


def test_tokenizer_round_trips_every_text_offline(embedded_model):
    tok = AutoTokenizer.from_pretrained(embedded_model)
    texts = [s.prompt + s.chosen for s in embedded_samples(200, seed=0)] + pretraining_texts(0, 50)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == " ".join(text.split())
    prompt, response = PROMPT, " sure ! 7 ."
    assert tok(prompt + response)["input_ids"] == tok(prompt)["input_ids"] + tok(response)["input_ids"]
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_embedded_model_is_cached_loads_cleanly_and_was_pretrained(embedded_model):
    stamp = (embedded_model / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == embedded_model
    assert (embedded_model / "model.safetensors").stat().st_mtime_ns == stamp   # not rebuilt
    model, info = AutoModelForCausalLM.from_pretrained(embedded_model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(embedded_model)
    texts = [p + " the answer is 2 ." for p in eval_prompts(16, seed=0)]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < 0.5 * math.log(model.config.vocab_size), f"pre-training did not take: loss {loss:.2f}"
