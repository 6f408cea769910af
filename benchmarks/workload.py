"""A FastGen-style mixed workload and the models the serving benchmarks run on."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TANDEM_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int


def mixed_workload(n: int, vocab_size: int, max_len: int, seed: int = 0, prompt_range=(16, 400),
                   output_range=(16, 200), avoid: set[int] = frozenset()) -> list[Request]:
    """n requests with uniform prompt and output lengths, prompt + output capped at max_len."""
    rng = random.Random(seed)
    allowed = [t for t in range(3, vocab_size) if t not in avoid]
    out = []
    for _ in range(n):
        new = rng.randint(*output_range)
        plen = min(rng.randint(*prompt_range), max_len - new - 1)
        out.append(Request([rng.choice(allowed) for _ in range(plen)], new))
    return out


def random_llama(out_dir: Path, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 4,
                 vocab: int = 8192, max_pos: int = 1024, seed: int = 0) -> Path:
    """A random-init Llama (GQA) saved as an HF folder; ~25M params with the defaults."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 + 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


def num_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p
