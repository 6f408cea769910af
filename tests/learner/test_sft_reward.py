"""Steps 1 and 2 on real data with a real pretrained model, in one process (DeepSpeed ZeRO-3, gloo)."""

from __future__ import annotations

import gzip
import itertools

import torch
from transformers import AutoModelForCausalLM

from learner.config import RewardConfig, SFTConfig
from learner.data import PairCollator, PairDataset
from learner.metrics import read_metrics
from learner.modeling import ValueModel, last_token_index, load_tokenizer
from learner.reward import run_reward
from learner.sft import run_sft


def test_reward_model_on_hh_rlhf_prints_held_out_accuracy_and_reloads(hh_rlhf_path, tinystories_path, tmp_path,
                                                                      capsys):
    subset = tmp_path / "hh300.jsonl"
    with gzip.open(hh_rlhf_path / "helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        subset.write_text("".join(itertools.islice(f, 300)), encoding="utf-8")
    config = RewardConfig(model=str(tinystories_path), data=[f"hh-rlhf:{subset}"], data_split="0,1,0",
                          output_dir=str(tmp_path / "reward"), max_seq_len=128, batch_size=8, learning_rate=1e-3,
                          eval_fraction=0.15, cache_dir=str(tmp_path / "cache"), seed=3,
                          gradient_checkpointing=True)
    result = run_reward(config)
    printed = capsys.readouterr().out
    assert "reward model before training: held-out accuracy" in printed
    assert "reward model after training: held-out accuracy" in printed and "mean chosen score" in printed
    assert result["train_pairs"] >= 250 and result["eval_pairs"] >= 40 and result["steps"] >= 30
    assert 0.0 <= result["eval_accuracy"] <= 1.0
    rows = read_metrics(tmp_path / "reward" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, result["steps"] + 1))  # every optimizer step
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, result["steps"]]     # eval before and after

    # the saved value model reproduces the held-out scores: its accuracy equals the one reported
    model = ValueModel.from_pretrained(tmp_path / "reward").eval()
    tokenizer = load_tokenizer(tmp_path / "reward")
    from learner.data import hold_out, load_dataset, split_for_steps
    _, held = hold_out(split_for_steps([load_dataset(f"hh-rlhf:{subset}")], "0,1,0", 3)[1], 0.15, 3)
    pairs = PairDataset(held, tokenizer, 128, cache_dir=tmp_path / "cache")
    batch = PairCollator(tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        values = model(batch["input_ids"], batch["attention_mask"])
    scores = values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)
    n = len(pairs)
    accuracy = float((scores[:n] > scores[n:]).float().mean())
    assert abs(accuracy - result["eval_accuracy"]) < 1e-6
    assert abs(float(scores[:n].mean()) - result["eval_chosen_score"]) < 1e-3


def test_sft_with_lora_only_lowers_held_out_loss_and_exports_fused(alpaca_path, tinystories_path, tmp_path):
    config = SFTConfig(model=str(tinystories_path), data=[f"alpaca:{alpaca_path}"], data_split="1,0,0",
                       output_dir=str(tmp_path / "sft"), max_seq_len=64, batch_size=8, max_steps=24,
                       learning_rate=3e-3, eval_fraction=0.01, cache_dir=str(tmp_path / "cache"), save_every=12)
    config.lora.lora_dim, config.lora.only_optimize_lora = 8, True
    result = run_sft(config)
    assert result["steps"] == 24 and result["eval_loss"] < result["eval_loss_before"] - 0.05
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "sft", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = AutoModelForCausalLM.from_pretrained(tinystories_path)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("proj" in n for n in changed)  # LoRA was fused into the linear layers only
    assert (tmp_path / "sft" / "resume" / "step12").is_dir() and (tmp_path / "sft" / "resume" / "step24").is_dir()

    # resume from the last checkpoint and go on to step 30: the log continues where it stopped
    config.max_steps, config.resume = 30, True
    resumed = run_sft(config)
    assert resumed["steps"] == 30
    steps = [row["step"] for row in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in row and "lr" in row]
    assert steps == list(range(1, 31))
