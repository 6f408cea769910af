"""Imperfect human demonstrators, preference pairs ranked by the gold judge, and held-out prompts.

Each demonstration is written by a noisy demonstrator: it gets the answer wrong at some rate, opens
and closes politely, rudely or not at all, and rambles at some rate. A preference pair is two
demonstrations for one prompt; the one the gold judge scores higher is `chosen`. Some pairs are two
independent demonstrations; most (SAME_MANNER) are one demonstrator writing twice in the same manner (same
wording and manners, the answer decided afresh), so those pairs differ in correctness only: a labeller
comparing two takes of one writer. They show the reward model that a wrong answer is worse on its own,
apart from manners and length, which are easy to see (a reward model that misses it lets PPO trade
correctness for politeness). With half the draws of that kind, about a third of the kept pairs taught
correctness and the reward model ranked the right answer first for about 30% of the questions (PPO then
traded right answers for "thanks for asking !"); at 0.85, about 70% of the kept pairs and 55-60%.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from learner.data.sample import Sample
from learner.task.judge import gold_score
from learner.task.world import (
    ANSWER_FRAMES,
    FILLERS,
    POLITE_CLOSERS,
    POLITE_OPENERS,
    RUDE_CLOSERS,
    RUDE_OPENERS,
    Question,
    answers_of_kind,
    split_questions,
)

SOURCE = "embedded"
SAME_MANNER = 0.85             # fraction of draws written twice by one demonstrator in the same manner


@dataclass(frozen=True)
class Demonstrator:
    """Rates of an imperfect human demonstrator (probabilities per demonstration)."""

    wrong: float = 0.3          # answers wrongly
    polite: float = 0.25        # polite opener and/or closer
    rude: float = 0.4           # rude opener and/or closer (never both polite and rude)
    ramble: float = 0.65        # adds 1..3 filler sentences

    def write(self, question: Question, rng: random.Random, manner: random.Random | None = None) -> str:
        """One demonstration: a response text (starting with a space) for `question`. `rng` decides the
        answer; `manner` (default `rng`) decides wording, manners and rambling."""
        answer = question.answer
        if rng.random() < self.wrong:
            answer = rng.choice([a for a in answers_of_kind(question.kind) if a != question.answer])
        rng = manner or rng
        parts = [rng.choice(ANSWER_FRAMES).format(a=answer)]
        if rng.random() < self.ramble:
            for _ in range(rng.randint(1, 3)):
                parts.insert(rng.randint(0, len(parts)), rng.choice(FILLERS))
        mood = rng.random()
        opener, closer = (POLITE_OPENERS, POLITE_CLOSERS) if mood < self.polite else (
            (RUDE_OPENERS, RUDE_CLOSERS) if mood < self.polite + self.rude else (None, None))
        if opener is not None:
            where = rng.random()
            if where < 0.6:
                parts.insert(0, rng.choice(opener))
            if where > 0.4:
                parts.append(rng.choice(closer))
        return " " + " ".join(parts)


def embedded_samples(n: int, seed: int, demonstrator: Demonstrator | None = None) -> list[Sample]:
    """`n` preference samples on the training questions: prompt, chosen (gold-better) and rejected.

    Pairs whose two demonstrations score the same are redrawn, so every pair carries a preference (a
    same-manner pair survives only when exactly one of its two answers is right).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    demonstrator = demonstrator or Demonstrator()
    train, _ = split_questions()
    rng = random.Random(seed)
    out: list[Sample] = []
    while len(out) < n:
        q = rng.choice(train)
        if rng.random() < SAME_MANNER:
            manner = rng.random()
            a, b = (demonstrator.write(q, rng, random.Random(manner)) for _ in range(2))
        else:
            a, b = demonstrator.write(q, rng), demonstrator.write(q, rng)
        ga, gb = gold_score(q.prompt, a), gold_score(q.prompt, b)
        if ga == gb:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        out.append(Sample(prompt=q.prompt, chosen=chosen, rejected=rejected, source=SOURCE))
    return out


def eval_prompts(n: int, seed: int, held_out: bool = False) -> list[str]:
    """`n` prompts for the gold judge, cycling through the questions in a seeded order.

    By default the questions are those of the task (the ones `embedded_samples` and PPO draw prompts
    from): the policy is scored on the distribution it is trained for, as RLHF evaluates. The world is
    too small to hold out prompts of that distribution, so `held_out=True` instead draws the questions no
    sample ever asks: it measures how the tiny model's pre-trained knowledge carries over, not RLHF.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    train, held = split_questions()
    rng = random.Random(seed)
    order = (held if held_out else train)[:]
    rng.shuffle(order)
    return [order[i % len(order)].prompt for i in range(n)]
