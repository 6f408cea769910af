"""Random-init HF checkpoints of a given shape, for tests and benchmarks (saved with save_pretrained)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# A ~25M-parameter Llama (vocab of the TinyStories tokenizer) for benchmarks where matmuls dominate.
LLAMA_25M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024)


def save_random_checkpoint(path: str | Path, architecture: str = "llama", seed: int = 0,
                           tokenizer: str | Path | None = None, **config: object) -> Path:
    """Save a random-init HF model of `architecture` ("llama" | "opt" | "gpt2") with the given config fields.

    When `tokenizer` names a tokenizer folder, its files are copied beside the weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "opt": (OPTConfig, OPTForCausalLM),
               "gpt2": (GPT2Config, GPT2LMHeadModel)}
    config_cls, model_cls = classes[architecture]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    out = Path(path)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))):
                shutil.copy(f, out / f.name)
    return out
