"""Models of the three steps: the tokenizer, the causal LM (actor, reference), the value model
(reward model, critic) and LoRA.

A value model is a causal LM's base transformer plus a scalar head (DeepSpeed-Chat's RewardModel). It is
saved as the base model's HF folder plus `value_head.safetensors`, and made from a causal LM folder by
taking the LM's own base model: the tied-embedding checkpoints (TinyStories stores the tied matrix only as
`lm_head.weight`) then keep their trained embeddings, unlike `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.errors import ConfigError
from learner.config import CommonConfig, LoraOptions

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


def _hf_folder(path: str | Path, field: str) -> Path:
    folder = Path(path)
    if not str(path) or not (folder / "config.json").is_file():
        raise ConfigError(field, f"no HF model folder (config.json) at {str(path)!r}")
    return folder


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer in a local folder, with a pad token (EOS or UNK when it has none)."""
    folder = Path(path)
    if not str(path) or not folder.is_dir():
        raise ConfigError("tokenizer", f"no tokenizer folder at {str(path)!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("tokenizer", f"cannot load a tokenizer from {str(path)!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ConfigError("tokenizer", f"{str(path)!r} has no pad, eos or unk token to pad with")
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from a local HF folder (tied embeddings are tied by transformers itself)."""
    folder = _hf_folder(path, "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.config.use_cache = False  # training; generate() turns the cache on for itself
    return model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row, for left or right padding: [B]."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class ValueModel(nn.Module):
    """A transformer backbone and a scalar head: one value per token."""

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.v_head = nn.Linear(backbone.config.hidden_size, 1, bias=False, dtype=backbone.dtype)
        nn.init.normal_(self.v_head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ValueModel:
        """A saved value model (folder with value_head.safetensors) or a fresh head on a causal LM folder."""
        folder = _hf_folder(path, "model")
        head_file = folder / VALUE_HEAD_FILE
        if head_file.is_file():
            from safetensors.torch import load_file

            model = cls(AutoModel.from_pretrained(str(folder), dtype=dtype))
            model.v_head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(head_file)).items()})
            return model
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        backbone = lm.base_model
        backbone.config.architectures = [type(backbone).__name__]
        log.info("value model: new head on the base model of %s", folder)
        return cls(backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, T] (float32). Pass position_ids for left-padded rows (see ppo.experience.position_ids)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.v_head(hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The value at the last real token of each row: [B]."""
        values = self.forward(input_ids, attention_mask, position_ids)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def _lora_targets(model: nn.Module, substring: str) -> list[str]:
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and substring in name
             and not name.endswith(("lm_head", "v_head"))]
    if not names:
        raise ConfigError("lora_module_name", f"no linear layer name contains {substring!r}")
    return names


def apply_lora(model: nn.Module, opts: LoraOptions) -> nn.Module:
    """Inject LoRA adapters (peft) in place into the linear layers named by opts.lora_module_name.

    With only_optimize_lora every other weight is frozen (a value model's head stays trainable).
    A no-op when opts.lora_dim is 0.
    """
    if opts.lora_dim == 0:
        return model
    from peft import LoraConfig, inject_adapter_in_model

    inner = model.backbone if isinstance(model, ValueModel) else model
    config = LoraConfig(r=opts.lora_dim, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                        target_modules=_lora_targets(inner, opts.lora_module_name))
    inject_adapter_in_model(config, inner)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith("v_head") or not opts.only_optimize_lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", opts.lora_dim, type(inner).__name__, trainable)
    return model


def has_dropout(model: nn.Module) -> bool:
    """Whether the model drops anything in train mode: a Dropout module with p > 0, or a dropout rate in its
    config (HF attention passes config.attention_dropout to the attention kernel, no module)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(getattr(model, "config", None), "__dict__", {})
    return any(isinstance(v, float) and v > 0 for k, v in config.items() if "dropout" in k or "pdrop" in k)


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base weight and put the plain layer back (in place; unpartitioned)."""
    replacements = [(name, module) for name, module in model.named_modules() if is_lora_layer(module)]
    for name, module in replacements:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def enable_gradient_checkpointing(model: torch.nn.Module, config: CommonConfig) -> None:
    """HF gradient checkpointing on the model's transformer when config.gradient_checkpointing is set."""
    if not getattr(config, "gradient_checkpointing", False):
        return
    target = getattr(model, "backbone", model)  # a ValueModel's transformer
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
