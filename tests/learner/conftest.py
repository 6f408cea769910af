"""A small step-3 run folder shared by the PPO, survival and resume tests: <run>/sft (TinyStories-656K),
<run>/reward (a value model on its backbone, seeded) and 36 prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia"]
THINGS = ["ball", "cat", "tree", "cake", "boat", "hat"]


@dataclass
class PPORun:
    root: Path

    def config(self, out: str | Path, **overrides):
        """A tiny, fast PPOConfig writing to `out` (absolute, or under the run folder)."""
        from learner.config import DeepSpeedOptions, PPOConfig

        base = dict(output_dir=str(self.root / out), actor_model=str(self.root / "sft"),
                    critic_model=str(self.root / "reward"), reward_model=str(self.root / "reward"),
                    tokenizer=str(self.root / "sft"), data=[f"dschat:{self.root / 'prompts.jsonl'}"],
                    data_split="0,0,1", rollout_batch_size=4, mini_batch_size=2, max_new_tokens=12, ppo_epochs=2,
                    kl_coef=0.05, actor_learning_rate=2e-4, critic_learning_rate=2e-4,
                    cache_dir=str(self.root / "cache"), deepspeed=DeepSpeedOptions(zero_stage=0))
        if "deepspeed" in overrides and isinstance(overrides["deepspeed"], dict):
            overrides["deepspeed"] = DeepSpeedOptions(**overrides["deepspeed"])
        base.update(overrides)
        return PPOConfig(**base).validate()

    def cli_args(self, out: str | Path, *extra: str) -> list[str]:
        """`python -m learner ppo` arguments for the same run."""
        return ["ppo", "--actor_model", str(self.root / "sft"), "--critic_model", str(self.root / "reward"),
                "--reward_model", str(self.root / "reward"), "--tokenizer", str(self.root / "sft"),
                "--data", f"dschat:{self.root / 'prompts.jsonl'}", "--data_split", "0,0,1",
                "--output_dir", str(self.root / out), "--rollout_batch_size", "4", "--mini_batch_size", "2",
                "--max_new_tokens", "12", "--zero_stage", "0", "--cache_dir", str(self.root / "cache"), *extra]


@pytest.fixture(scope="session")
def ppo_run(tinystories_path, tmp_path_factory) -> PPORun:
    import torch

    from learner import checkpoint, modeling

    root = tmp_path_factory.mktemp("ppo_run")
    tok = modeling.load_tokenizer(tinystories_path)
    checkpoint.save_hf(modeling.load_causal_lm(tinystories_path), tok, root / "sft")
    torch.manual_seed(0)
    checkpoint.save_hf(modeling.ValueModel.from_pretrained(tinystories_path), tok, root / "reward", value_head=True)
    with open(root / "prompts.jsonl", "w") as f:
        for name in NAMES:
            for thing in THINGS:
                f.write(json.dumps({"prompt": f"Once upon a time, {name} had a {thing}.", "chosen": " It was fun.",
                                    "rejected": " No."}) + "\n")
    return PPORun(root)
