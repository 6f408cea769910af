"""Chat messages -> the prompt the model sees.

With a chat template (`chat_template` in the tokenizer's tokenizer_config.json, or a chat_template.jinja
beside it, as transformers loads them), the messages are rendered by it with the generation prompt
appended, and the text is tokenized without adding special tokens again (the template writes them).

Without one (base models such as TinyStories), the documented fallback is a plain transcript, one
message per line as `role: content`, ending with `assistant:` for the model to continue; it is tokenized
like a completion prompt (the tokenizer's own BOS handling applies).
"""

from __future__ import annotations

FALLBACK_GENERATION_PROMPT = "assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fallback_transcript(messages: list[dict]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, FALLBACK_GENERATION_PROMPT])


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """(prompt text, its token ids) for `messages` ({role, content} with string content)."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = fallback_transcript(messages)
    return text, list(tokenizer.encode(text))
