"""The hidden gold judge of the embedded task, as PPO sees it: scores of sampled rollouts for the logs,
and the mean gold score of greedy responses on held-out prompts before and after training.

The judge is never used for training; it is what a human would want, reported beside the learned
reward so reward hacking shows as a reward rising while the gold score does not.
"""

from __future__ import annotations

from learner.config import PPOConfig
from learner.rollout.local import LocalRolloutSource, Rollout, SamplingParams

DEFAULT_EVAL_PROMPTS = 64
EVAL_BATCH = 32


def has_gold_judge(data_specs: list[str]) -> bool:
    """True when every dataset is the embedded task (the only data with a gold judge)."""
    return bool(data_specs) and all(spec.split(":", 1)[0] == "embedded" for spec in data_specs)


class GoldJudge:
    def __init__(self, tokenizer, prompts: list[str], max_prompt_len: int, max_new_tokens: int):
        from learner.task import gold_score

        self.tokenizer, self.prompts, self.gold_score = tokenizer, prompts, gold_score
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens

    def score_rollouts(self, prompt_texts: list[str], rollouts: list[Rollout]) -> float:
        scores = [self.gold_score(p, r.text) for p, r in zip(prompt_texts, rollouts)]
        return sum(scores) / max(len(scores), 1)

    def responses(self, actor) -> list[str]:
        """Greedy responses of `actor` (an engine or a plain model) to the held-out prompts."""
        source = LocalRolloutSource(actor, self.tokenizer)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        texts = []
        for start in range(0, len(self.prompts), EVAL_BATCH):
            chunk = self.prompts[start:start + EVAL_BATCH]
            ids = [self.tokenizer(p).input_ids[-self.max_prompt_len:] for p in chunk]
            texts.extend(r.text for r in source.generate(ids, params))
        return texts

    def evaluate(self, actor) -> float:
        """Mean gold score (0-100) of greedy responses on the held-out prompts."""
        texts = self.responses(actor)
        return sum(self.gold_score(p, t) for p, t in zip(self.prompts, texts)) / max(len(texts), 1)


def gold_judge_for(config: PPOConfig, tokenizer) -> GoldJudge | None:
    if not has_gold_judge(config.data):
        return None
    from learner.task import eval_prompts

    n = getattr(config, "gold_eval_prompts", DEFAULT_EVAL_PROMPTS)
    return GoldJudge(tokenizer, eval_prompts(n, config.seed), config.max_prompt_len, config.max_new_tokens)
