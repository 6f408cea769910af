"""Dataset adapters: each turns one raw record into a Sample, or names why the record is bad.

The contract is DeepSpeed-Chat's PromptRawDataset (get_prompt / get_chosen / get_rejected), with one
function per format instead of one class per dataset. An adapter returns `(sample, None)` or
`(None, reason)`; reasons are short fixed strings so they can be counted.
"""

from __future__ import annotations

from collections.abc import Callable

from learner.data.sample import Sample

ASSISTANT = "\n\nAssistant:"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

Result = tuple[Sample | None, str | None]


def _text(record: dict, key: str) -> tuple[str | None, str | None]:
    """The string under `key`, or the reason it is unusable."""
    if key not in record:
        return None, f"missing key {key!r}"
    value = record[key]
    if not isinstance(value, str):
        return None, f"{key!r} is not a string"
    if not value.strip():
        return None, f"empty {key!r}"
    return value, None


def hh_rlhf(record: dict, source: str) -> Result:
    """Anthropic HH-RLHF: two full dialogues; the prompt ends at the last "\\n\\nAssistant:"."""
    chosen, bad = _text(record, "chosen")
    if bad:
        return None, bad
    rejected, bad = _text(record, "rejected")
    if bad:
        return None, bad
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return None, "no assistant turn"
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        return None, "chosen and rejected differ before the last turn"
    chosen_reply, rejected_reply = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen_reply.strip() or not rejected_reply.strip():
        return None, "empty response"
    if chosen_reply == rejected_reply:
        return None, "chosen equals rejected"
    return Sample(prompt, chosen_reply, rejected_reply, source), None


def dschat(record: dict, source: str) -> Result:
    """DeepSpeed-Chat local json: prompt / chosen / rejected (rejected may be absent for SFT-only data)."""
    prompt, bad = _text(record, "prompt")
    if bad:
        return None, bad
    chosen, bad = _text(record, "chosen")
    if bad:
        return None, bad
    rejected = None
    if record.get("rejected") is not None:
        rejected, bad = _text(record, "rejected")
        if bad:
            return None, bad
        if rejected == chosen:
            return None, "chosen equals rejected"
    return Sample(prompt, chosen, rejected, source), None


def alpaca(record: dict, source: str) -> Result:
    """Alpaca instruction data: instruction / input / output, in the usual Alpaca prompt."""
    instruction, bad = _text(record, "instruction")
    if bad:
        return None, bad
    output, bad = _text(record, "output")
    if bad:
        return None, bad
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        return None, "'input' is not a string"
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    return Sample(template.format(instruction=instruction, input=extra), output, None, source), None


def text(record: dict | str, source: str) -> Result:
    """Plain text for the ptx loss: a string, or a JSON object with a "text" field."""
    if isinstance(record, dict):
        value, bad = _text(record, "text")
        if bad:
            return None, bad
    else:
        value = record
        if not value.strip():
            return None, "empty 'text'"
    return Sample(value, None, None, source), None


def sharegpt(record: dict, source: str) -> Result:
    """ShareGPT-style preference pairs (LLaMA-Factory): conversations + chosen/rejected {"from", "value"} turns,
    rendered in the HH-RLHF dialogue format so every preference source reads alike."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, "missing key 'conversations'"
    roles = {"system": "", "human": "\n\nHuman: ", "user": "\n\nHuman: ", "gpt": "\n\nAssistant: ",
             "assistant": "\n\nAssistant: "}
    prompt = ""
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            return None, "bad conversation turn"
        prompt += roles[turn["from"]] + turn["value"]
    replies = []
    for key in ("chosen", "rejected"):
        turn = record.get(key)
        value = turn.get("value") if isinstance(turn, dict) else turn
        if not isinstance(value, str) or not value.strip():
            return None, f"missing or empty {key!r}"
        replies.append(" " + value)
    if replies[0] == replies[1]:
        return None, "chosen equals rejected"
    return Sample(prompt + ASSISTANT, replies[0], replies[1], source), None


ADAPTERS: dict[str, Callable[[dict, str], Result]] = {
    "hh-rlhf": hh_rlhf,
    "dschat": dschat,
    "alpaca": alpaca,
    "text": text,
    "sharegpt": sharegpt,
}


def detect_kind(record: dict | None) -> str:
    """Guess the format from the first record's keys (None: not JSON, so plain text)."""
    if record is None:
        return "text"
    keys = set(record)
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "chosen"} <= keys:
        return "dschat"
    if {"chosen", "rejected"} <= keys:
        return "hh-rlhf"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return ""
