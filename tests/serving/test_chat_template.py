"""Chat messages -> prompt: the model's own chat template when tokenizer_config.json has one, else the
documented `role: content` transcript (TinyStories has none)."""

from __future__ import annotations

import json
import shutil

from transformers import AutoTokenizer

from serving.http.chat_template import FALLBACK_GENERATION_PROMPT, render_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about a cat."}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_fallback_transcript_without_a_template(tinystories_path):
    tokenizer = AutoTokenizer.from_pretrained(tinystories_path)
    text, ids = render_chat(tokenizer, MESSAGES)
    assert text == f"system: Be brief.\nuser: Tell me about a cat.\n{FALLBACK_GENERATION_PROMPT}"
    assert ids == list(tokenizer.encode(text))


def test_the_models_chat_template_is_used(tinystories_path, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tinystories_path / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text, ids = render_chat(tokenizer, MESSAGES)
    assert text == "<|start_story|><system>Be brief.\n<user>Tell me about a cat.\n<assistant>"
    assert ids == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert ids.count(tokenizer.bos_token_id) == 1          # the template's BOS, not a second one
