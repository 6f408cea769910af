"""Model registry: HF `model_type` -> our implementation, and `load_model` for a local checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

from common.checkpoint import iter_checkpoint
from common.errors import ConfigError
from serving.models.base import CausalLM


def _registry() -> dict[str, type[CausalLM]]:
    from serving.models.gpt2 import GPT2LMHeadModel
    from serving.models.llama import LlamaForCausalLM
    from serving.models.opt import OPTForCausalLM

    return {"llama": LlamaForCausalLM, "opt": OPTForCausalLM, "gpt2": GPT2LMHeadModel}


SUPPORTED_ARCHITECTURES = ("llama", "opt", "gpt2")


def read_hf_config(path: str | Path):
    """The HF config of a local model folder (never the hub)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError("model", f"{folder} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError("model", f"cannot read {folder / 'config.json'}: {exc}") from exc


def model_class(hf_config) -> type[CausalLM]:
    model_type = getattr(hf_config, "model_type", None)
    registry = _registry()
    if model_type not in registry:
        raise ConfigError("model", f"architecture {model_type!r} is not supported "
                                   f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return registry[model_type]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[CausalLM, object]:
    """Build our model for the checkpoint at `path` and load its weights: (model, hf_config)."""
    hf_config = read_hf_config(path)
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to_empty(device=torch.device(device)).to(dtype)
    model.tie_weights()
    model.load_checkpoint(iter_checkpoint(Path(path)))
    return model.eval().requires_grad_(False), hf_config
