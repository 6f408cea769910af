"""The embedded task's world: questions with one right answer (small arithmetic and fact lookup).

Every text in the task is a sequence of space-separated words drawn from `vocabulary()`, so the
word-level tokenizer round-trips it exactly. A prompt reads "human : <question> ? assistant :" and the
response follows it, starting with a space.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_OPERAND = 5                                            # small enough for a tiny model to know every sum
NUMBERS = [str(i) for i in range(2 * MAX_OPERAND + 1)]     # answers of 0..5 plus/minus 0..5
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "pig": "oink", "bee": "buzz", "horse": "neigh"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow",
          "tomato": "red", "orange": "orange", "plum": "purple", "chocolate": "brown", "flamingo": "pink"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
             "old": "new", "open": "closed", "light": "dark", "wet": "dry"}

# words a demonstrator may add; the gold judge reads them (see judge.py)
POLITE_OPENERS = ["sure !", "of course !", "happy to help !"]
POLITE_CLOSERS = ["hope this helps !", "thanks for asking !", "glad to help !"]
RUDE_OPENERS = ["ugh ,", "whatever ,", "seriously ?"]
RUDE_CLOSERS = ["obviously .", "that was a dumb question .", "stop bothering me ."]
FILLERS = ["let me think about this for a while .", "i have always liked questions like this one .",
           "my friend asked me the same thing once .", "this reminds me of a story about my school .",
           "well , there are many ways to look at it .", "some people get this wrong but not me .",
           "i will explain it step by step now .", "you know , it is a very good question ."]
ANSWER_FRAMES = ["{a} .", "the answer is {a} .", "it is {a} ."]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class Question:
    """One question: its words (without the dialogue frame), its kind and its one right answer."""

    text: str
    kind: str        # plus | minus | sound | color | opposite
    answer: str

    @property
    def prompt(self) -> str:
        return f"human : {self.text} ? assistant :"


def all_questions() -> list[Question]:
    """Every question the world can ask (a fixed, ordered list)."""
    digits = range(MAX_OPERAND + 1)
    out = [Question(f"what is {a} plus {b}", "plus", str(a + b)) for a in digits for b in digits]
    out += [Question(f"what is {a} minus {b}", "minus", str(a - b)) for a in digits for b in range(a + 1)]
    out += [Question(f"what does a {k} say", "sound", v) for k, v in SOUNDS.items()]
    out += [Question(f"what color is the {k}", "color", v) for k, v in COLORS.items()]
    out += [Question(f"what is the opposite of {k}", "opposite", v) for k, v in OPPOSITES.items()]
    return out


def answers_of_kind(kind: str) -> list[str]:
    """The answer words a question of this kind can have (wrong answers are drawn from here)."""
    if kind in ("plus", "minus"):
        return NUMBERS
    return list({"sound": SOUNDS, "color": COLORS, "opposite": OPPOSITES}[kind].values())


ANSWER_WORDS = frozenset(NUMBERS) | frozenset(SOUNDS.values()) | frozenset(COLORS.values()) | frozenset(
    OPPOSITES.values())


def parse_prompt(prompt: str) -> Question | None:
    """The question a prompt asks, or None when it is not one of this world's prompts."""
    return _BY_PROMPT.get(" ".join(prompt.split()))


def split_questions(seed: int = 0, held_out: float = 0.2) -> tuple[list[Question], list[Question]]:
    """A fixed split of the questions into (train, held-out), balanced per kind."""
    rng = random.Random(seed)
    train, held = [], []
    for kind in ("plus", "minus", "sound", "color", "opposite"):
        qs = [q for q in all_questions() if q.kind == kind]
        rng.shuffle(qs)
        cut = max(1, round(len(qs) * held_out))
        held += qs[:cut]
        train += qs[cut:]
    return train, held


def vocabulary() -> list[str]:
    """Every word of the world, specials first (the tokenizer's vocabulary, in id order)."""
    texts = [q.prompt + " " + q.answer for q in all_questions()]
    texts += POLITE_OPENERS + POLITE_CLOSERS + RUDE_OPENERS + RUDE_CLOSERS + FILLERS + ANSWER_FRAMES
    texts += [f"a {k} says {v} ." for k, v in SOUNDS.items()] + [f"the {k} is {v} ." for k, v in COLORS.items()]
    texts += [f"{a} and {b} are opposites ." for a, b in OPPOSITES.items()]
    words: list[str] = []
    for t in texts:
        for w in t.replace("{a}", "").split():
            if w not in words:
                words.append(w)
    return SPECIALS + sorted(words)


_BY_PROMPT = {q.prompt: q for q in all_questions()}
