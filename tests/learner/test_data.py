"""The data layer on real files: adapters, bad-record counts, the data_split rule, tokenization, cache, collators."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from common.errors import ConfigError
from learner.data import (
    CausalLMCollator,
    PairCollator,
    PairDataset,
    PromptCollator,
    PromptDataset,
    Sample,
    SFTDataset,
    TextDataset,
    load_dataset,
    split_for_steps,
)
from learner.data.load import DataReport, LoadedDataset


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hh_rlhf_real_split_matches_the_raw_records(hh_rlhf_path):
    path = hh_rlhf_path / "helpful-base" / "test.jsonl.gz"
    loaded = load_dataset(f"hh-rlhf:{path}")
    report = loaded.report
    assert report.total == 2354 and report.kept == len(loaded.samples)
    assert report.kept + sum(report.bad.values()) == report.total and report.kept > 2300
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    first = loaded.samples[0]
    assert first.prompt.endswith("\n\nAssistant:") and first.prompt.startswith("\n\nHuman:")
    assert first.prompt + first.chosen == raw[0]["chosen"] and first.prompt + first.rejected == raw[0]["rejected"]
    assert "\n\nAssistant:" not in first.chosen
    # a bare path is detected as hh-rlhf by its keys
    assert load_dataset(str(path)).samples[:5] == loaded.samples[:5]


def test_bad_records_are_counted_per_reason_not_fatal(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    rows = [good, "{not json", [1, 2], {"chosen": good["chosen"]}, {**good, "rejected": ""},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            {"chosen": "no turns at all", "rejected": "x"}, good]
    loaded = load_dataset(f"hh-rlhf:{write_jsonl(tmp_path / 'hh.jsonl', rows)}")
    assert loaded.report.total == 8 and loaded.report.kept == 2
    assert loaded.report.bad == {"invalid json": 1, "not an object": 1, "missing key 'rejected'": 1,
                                 "empty 'rejected'": 1, "chosen and rejected differ before the last turn": 1,
                                 "no assistant turn": 1}
    assert loaded.samples[0] == Sample("\n\nHuman: hi\n\nAssistant:", " hello", " go away", "hh-rlhf:hh.jsonl")


def test_dschat_alpaca_text_and_auto_detection(tmp_path, alpaca_path):
    dschat = tmp_path / "dschat.json"
    dschat.write_text(json.dumps([{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
                                  {"prompt": "Q: sky?", "chosen": " blue"}, {"prompt": "", "chosen": "x"}]))
    d = load_dataset(str(dschat))
    assert [s.rejected for s in d.samples] == [" 3", None] and d.report.bad == {"empty 'prompt'": 1}

    a = load_dataset(f"alpaca:{alpaca_path}")
    with_input = next(s for s in a.samples if "### Input:" in s.prompt)
    assert with_input.prompt.startswith("### Instruction:\n") and with_input.prompt.endswith("### Response:\n")
    assert a.report.total == 5000 and a.report.kept + sum(a.report.bad.values()) == 5000

    paragraphs = tmp_path / "corpus.txt"
    paragraphs.write_text("one line\nstill one\n\n\nsecond\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("a\nb\nc\n")
    assert [s.prompt for s in load_dataset(f"text:{paragraphs}").samples] == ["one line\nstill one", "second"]
    assert [s.prompt for s in load_dataset(f"text:{lines}").samples] == ["a", "b", "c"]


def test_bad_specs_name_the_data_field(tmp_path):
    for spec in ("hh-rlhf:/no/such/file.jsonl", "/no/such/folder", "nosuchkind:x", "embedded:zero"):
        with pytest.raises(ConfigError) as err:
            load_dataset(spec)
        assert err.value.field == "data" and spec in str(err.value)
    empty = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "", "rejected": ""}])
    with pytest.raises(ConfigError, match="no usable records"):
        load_dataset(f"hh-rlhf:{empty}")


def _dataset(name, n):
    samples = [Sample(f"{name} prompt {i}", f" c{i}", f" r{i}", name) for i in range(n)]
    return LoadedDataset(name, samples, DataReport(name, n, n))


def test_data_split_rule_is_seeded_disjoint_and_blended():
    a, b = _dataset("a", 100), _dataset("b", 50)
    s1, s2, s3 = split_for_steps([a, b], "2,4,4", seed=7)
    assert (len(s1), len(s2), len(s3)) == (30, 60, 60)
    assert sum(s.source == "a" for s in s1) == 20 and sum(s.source == "b" for s in s1) == 10
    prompts = [{s.prompt for s in part} for part in (s1, s2, s3)]
    assert not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2]) and not (prompts[0] & prompts[2])
    assert len(prompts[0] | prompts[1] | prompts[2]) == 150
    assert split_for_steps([a, b], "2,4,4", seed=7) == (s1, s2, s3)
    assert split_for_steps([a, b], "2,4,4", seed=8)[0] != s1
    assert [len(p) for p in split_for_steps([a], "1,0,0", seed=1)] == [100, 0, 0]


@pytest.fixture(scope="module")
def tokenizer(tinystories_path):
    from learner.modeling import load_tokenizer
    return load_tokenizer(tinystories_path)


def test_tokenized_datasets_mask_truncate_and_cache(tokenizer, tmp_path):
    long_prompt = "Once upon a time " * 40
    samples = [Sample("Q: what is two plus two?\nA:", " four.", " five!"), Sample(long_prompt, " The end.", " No.")]
    sft = SFTDataset(samples, tokenizer, 32, cache_dir=tmp_path)
    assert not sft.from_cache and len(sft) == 2
    item = sft[0]
    prompt_len = len(tokenizer("Q: what is two plus two?\nA:").input_ids)
    assert (item["labels"][:prompt_len] == -100).all()
    assert item["labels"][prompt_len:].tolist() == item["input_ids"][prompt_len:].tolist()
    assert item["input_ids"][-1].item() == tokenizer.eos_token_id
    long_item = sft[1]
    assert len(long_item["input_ids"]) == 32 and long_item["input_ids"][0].item() == tokenizer.bos_token_id
    again = SFTDataset(samples, tokenizer, 32, cache_dir=tmp_path)
    assert again.from_cache and again.cache_path == sft.cache_path
    assert all(torch.equal(again[i]["input_ids"], sft[i]["input_ids"]) for i in range(2))
    assert SFTDataset(samples, tokenizer, 33, cache_dir=tmp_path).cache_path != sft.cache_path

    pairs = PairDataset(samples + [Sample("p", " same", " same"), Sample("p", " only chosen")], tokenizer, 32,
                        cache_dir=tmp_path)
    assert len(pairs) == 2 and pairs.dropped == {"chosen equals rejected after truncation": 1,
                                                 "no rejected response": 1}
    chosen, rejected = pairs[1]["chosen_ids"], pairs[1]["rejected_ids"]
    assert len(chosen) <= 32 and len(rejected) <= 32 and not torch.equal(chosen, rejected)

    prompts = PromptDataset(samples, tokenizer, 16, cache_dir=tmp_path)
    assert len(prompts[1]["input_ids"]) == 16 and prompts.sample(1).prompt == long_prompt
    text = TextDataset([Sample("a tiny story about a cat")], tokenizer, 64, cache_dir=tmp_path)
    assert torch.equal(text[0]["input_ids"], text[0]["labels"])


def test_collators_pad_right_for_training_and_left_for_prompts(tokenizer, tmp_path):
    samples = [Sample("Hi", " there friend.", " no."), Sample("A much longer prompt here", " ok", " bad")]
    pad = tokenizer.pad_token_id
    sft = SFTDataset(samples, tokenizer, 64, cache_dir=tmp_path)
    batch = CausalLMCollator(pad)([sft[0], sft[1]])
    row = min((0, 1), key=lambda i: len(sft[i]["input_ids"]))  # the shorter, padded row
    n = len(sft[row]["input_ids"])
    assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
    assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == pad).all()

    pairs = PairDataset(samples, tokenizer, 64, cache_dir=tmp_path)
    pb = PairCollator(pad)([pairs[0], pairs[1]])
    assert pb["input_ids"].shape[0] == 4
    assert pb["attention_mask"][2].sum() == len(pairs[0]["rejected_ids"])

    prompts = PromptDataset(samples, tokenizer, 64, cache_dir=tmp_path)
    lb = PromptCollator(pad)([prompts[0], prompts[1]])
    k = len(prompts[0]["input_ids"])
    assert lb["attention_mask"][0, -k:].all() and not lb["attention_mask"][0, :-k].any()
    assert lb["input_ids"][0, -k:].tolist() == prompts[0]["input_ids"].tolist()


def test_embedded_task_spec_blends_with_a_file_dataset(tmp_path):
    from learner.inputs import read_dataset

    embedded = read_dataset("embedded:40", seed=5)
    assert len(embedded.samples) == 40 and embedded.report.kept == 40
    assert all(s.prompt and s.chosen and s.rejected for s in embedded.samples)
    assert read_dataset("embedded:40", seed=5).samples == embedded.samples
    dschat = tmp_path / "d.jsonl"
    write_jsonl(dschat, [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(10)])
    s1, s2, s3 = split_for_steps([embedded, load_dataset(f"dschat:{dschat}")], "1,1,0", seed=0)
    assert (len(s1), len(s2), len(s3)) == (25, 25, 0)
    assert {s.source for s in s1} == {"embedded", "dschat:d.jsonl"}


def test_sft_only_data_goes_wholly_to_step_one(tmp_path):
    from learner.config import SFTConfig
    from learner.inputs import step_samples

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": " r"}
                                                   for i in range(20)])
    sft_only = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"do {i}", "output": "done"} for i in range(7)])
    config = SFTConfig(data=[f"dschat:{pairs}"], sft_only_data=[f"alpaca:{sft_only}"], data_split="1,1,2",
                       eval_fraction=0.0).validate()
    train, held = step_samples(config, "sft")
    assert len(train) == 5 + 7 and not held
    assert sum(s.source == "alpaca:sft.jsonl" for s in train) == 7
