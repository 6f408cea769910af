"""`tandem learn sft --num-ranks 2`: two ranks under the real deepspeed launcher, ZeRO-3, loss falling,
and a consolidated checkpoint that HF from_pretrained loads with no missing keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_two_ranks_zero3_under_the_deepspeed_launcher(alpaca_path, tinystories_path, tmp_path):
    out = tmp_path / "sft"
    env = {**os.environ, "TANDEM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "cli.learn", "sft", "--num-ranks", "2", "--zero_stage", "3",
               "--model", str(tinystories_path), "--data", f"alpaca:{alpaca_path}", "--data_split", "1,0,0",
               "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "16",
               "--learning_rate", "2e-3", "--eval_fraction", "0.01", "--log_every", "4"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed.launcher.runner --num_gpus 2" in proc.stderr
    assert "[rank 1]" in proc.stdout + proc.stderr  # the second rank really ran
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"step": "sft"')))
    assert summary["steps"] == 16 and summary["eval_loss"] < summary["eval_loss_before"]

    losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = AutoModelForCausalLM.from_pretrained(tinystories_path)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # trained, full tensors
    assert model.model.embed_tokens.weight.shape == base.model.embed_tokens.weight.shape
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("### Instruction:\nName a color.\n\n### Response:\n", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 8 or generated[0, -1] == tokenizer.eos_token_id
    assert (out / "resume" / "latest").is_file()
