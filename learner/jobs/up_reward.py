"""The score of a `tandem up` run on data with no gold judge (hh-rlhf and any other real data): the learned reward
model's, since that is all there is.

Only the embedded task has a gold judge. On real preference data PPO trains on the reward model's score and
the report can show only that score: the reward model's held-out pairwise accuracy (step 2), the mean
reward-model score of greedy responses to held-out PPO prompts before PPO (the SFT model) and after it (the
PPO actor, and the served model over gRPC), the KL to the reference, and a few of those prompts answered side
by side with their reward scores. A reward that rises says the policy learned what the reward model prefers,
not that it got better: with no gold judge, reward hacking cannot be seen.

    held_out_prompts(ppo_config) -> {"ids", "texts"}        (in the learner, rank 0)
    reward_report(address, model, run_dir, learned) -> (figures, side-by-side rows)   (in `tandem up`)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EVAL_PROMPTS = 32                       # held-out PPO prompts scored before and after
SHOWN = 4                               # of them, answered side by side
BATCH = 32                              # prompts per generate call, rollouts per scoring pass

NO_GOLD = ("no gold judge exists for this data: PPO trains on the learned reward model's score, and that score "
           "(not a measure of quality) is what is shown")


def held_out_prompts(config, n: int = EVAL_PROMPTS) -> dict[str, list]:
    """Token ids and texts of up to `n` of step 3's held-out prompts, encoded as PPO encodes its prompts."""
    from learner.data.tokenized import PromptDataset
    from learner.inputs import cache_dir, step_samples, tokenizer_path
    from learner.modeling import load_tokenizer

    _, held = step_samples(config, "ppo")
    tokenizer = load_tokenizer(tokenizer_path(config, config.actor_model))
    prompts = PromptDataset(held[:n], tokenizer, config.max_prompt_len, cache_dir(config))
    return {"ids": [prompts[i]["input_ids"].tolist() for i in range(len(prompts))],
            "texts": [prompts.sample(i).prompt for i in range(len(prompts))]}


class RewardJudge:
    """The trained reward model (HF, in this process), scoring rollouts as PPO scores them: the value at the
    last token of [prompt | response]."""

    def __init__(self, reward_dir: str | Path, pad_id: int):
        from learner.modeling import ValueModel

        self.model = ValueModel.from_pretrained(reward_dir).eval()
        self.pad_id = pad_id

    @torch.no_grad()
    def scores(self, rollouts) -> list[float]:
        from learner.ppo.experience import SequenceBatch

        out: list[float] = []
        for start in range(0, len(rollouts), BATCH):
            seq = SequenceBatch.from_rollouts(rollouts[start:start + BATCH], self.pad_id)
            mask = seq.attention_mask
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)     # left padding: as PPO's reward forward
            out.extend(self.model.score(seq.input_ids, mask, positions).tolist())
        return out


def greedy_of_checkpoint(path: str | Path, tokenizer, ids: list[list[int]], max_new_tokens: int) -> list:
    """Greedy rollouts of an HF checkpoint (in this process)."""
    from learner.modeling import load_causal_lm
    from learner.rollout.local import LocalRolloutSource, SamplingParams

    source = LocalRolloutSource(load_causal_lm(path).eval(), tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [r for start in range(0, len(ids), BATCH) for r in source.generate(ids[start:start + BATCH], params)]


def greedy_of_server(address: str, ids: list[list[int]], max_new_tokens: int) -> list:
    """Greedy rollouts of the served model (over gRPC)."""
    from learner.rollout.local import SamplingParams
    from learner.rollout.remote import RemoteRolloutSource

    with RemoteRolloutSource(address, max_staleness=0) as source:
        return source.rollout(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), 1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def reward_report(address: str, model: str, run_dir: Path, learned: dict) -> tuple[dict, list[dict]]:
    """The reward-model figures of a run with no gold judge, and the side-by-side rows (reward, not gold)."""
    from learner.modeling import load_tokenizer

    held = learned.get("held_out") or {}
    ids, texts = held.get("ids", []), held.get("texts", [])
    if not ids:
        log.warning("no held-out PPO prompts to score: the reward before/after is not measured")
        return {"reward_before": None, "reward_after": None, "reward_after_served": None, "reward_gain": None,
                "reward_eval_prompts": 0}, []
    tokenizer = load_tokenizer(model)
    judge = RewardJudge(run_dir / "reward", tokenizer.pad_token_id)
    new = learned["max_new_tokens"]
    before = greedy_of_checkpoint(run_dir / "sft", tokenizer, ids, new)
    after = greedy_of_checkpoint(learned["checkpoint"], tokenizer, ids, new)
    served = greedy_of_server(address, ids, new)
    sb, sa, ss = judge.scores(before), judge.scores(after), judge.scores(served)
    figures = {"reward_before": _mean(sb), "reward_after": _mean(sa), "reward_after_served": _mean(ss),
               "reward_gain": _mean(sa) - _mean(sb), "reward_eval_prompts": len(ids)}
    rows = [{"prompt": text, "sft": b.text.strip(), "served": s.text.strip(), "weight_version": s.weight_version,
             "sft_gold": None, "served_gold": None, "sft_reward": rb, "served_reward": rs}
            for text, b, s, rb, rs in list(zip(texts, before, served, sb, ss))[:SHOWN]]
    return figures, rows


def last_question(prompt: str, width: int = 60) -> str:
    """The last human turn of a dialogue prompt, on one line, cut to `width` characters."""
    text = prompt.rsplit("Human:", 1)[-1].rsplit("Assistant:", 1)[0]
    return clip(text, width)


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
