"""Gold score of a saved checkpoint on held-out prompts: greedy, or the policy's mean over samples."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.task.demos import eval_prompts
from learner.task.judge import gold_score


@torch.no_grad()
def greedy_answers(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """The checkpoint's greedy responses to `prompts` (HF generate in this process)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def showcase_prompts() -> list[str]:
    """A few fixed prompts no training sample asks: the first held-out question of each kind."""
    from learner.task.world import split_questions

    _, held = split_questions()
    firsts: dict[str, str] = {}
    for q in held:
        firsts.setdefault(q.kind, q.prompt)
    return list(firsts.values())


@torch.no_grad()
def gold_of_checkpoint(model_dir: str | Path, *, n_prompts: int = 64, samples_per_prompt: int = 4,
                       temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 0,
                       held_out: bool = False) -> float:
    """Mean gold score (0..100) of responses to `eval_prompts(n_prompts, seed, held_out)`; temperature 0 is
    greedy (one response per prompt), else `samples_per_prompt` sampled responses each (what PPO optimises)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompts = eval_prompts(n_prompts, seed, held_out)
    repeats = 1 if temperature == 0 else samples_per_prompt
    texts = [p for p in prompts for _ in range(repeats)]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
            do_sample=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **sampling)
    finally:
        torch.random.set_rng_state(generator_state)
    responses = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(gold_score(p, r) for p, r in zip(texts, responses)) / len(texts)
