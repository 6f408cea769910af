"""The unified record every dataset adapter produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One record in the unified format (DeepSpeed-Chat's get_prompt/get_chosen/get_rejected).

    `prompt` ends where the response starts (for HH-RLHF: just after the last "\\n\\nAssistant:").
    SFT trains on prompt + chosen; the reward model on (prompt + chosen, prompt + rejected); PPO uses the
    prompt alone; ptx (plain text) records carry the text in `prompt` and nothing else.
    """

    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    source: str = ""
