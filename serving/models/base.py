"""What every serving model shares: HF-named parameters, checkpoint loading, and the logits head.

Models keep HF's parameter names and shapes (`model.layers.0.self_attn.q_proj.weight`, GPT-2's Conv1D
`[in, out]` matrices), so a HF state dict maps onto them by name and weight pushes need no renaming.
A model's forward takes the flat batch: input_ids [T], positions [T], the pass's AttentionMetadata and
the per-layer KV caches, and returns hidden states [T, hidden].
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import ConfigError, FieldError
from serving.layers.linear import PackedLinear, repack_stale

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """How tensor parallelism splits one parameter (serving.parallel.tp applies it)."""
    dim: int          # the split dimension of the stored tensor (HF layout)
    row: bool         # row-parallel (input split): the module's output needs an all_reduce
    parts: int = 1    # fused tensors (GPT-2 c_attn = q|k|v): each part is split separately


TPPlan = tuple[tuple[str, Shard], ...]   # (regex on the HF parameter name, Shard); first match wins


class CausalLM(nn.Module):
    """Base of the serving models: HF-named parameters, checked weight writes, the LM head.

    Each family declares its tensor-parallel plan (`tp_plan`): which parameters are split column-wise
    (output features) or row-wise (input features, followed by one all_reduce); the rest is replicated."""

    lm_head: nn.Linear
    tied: bool = False  # the LM head shares the input embedding matrix
    tp_plan: ClassVar[TPPlan] = ()

    def __init__(self):
        super().__init__()
        self.head = PackedLinear(self, ("lm_head",))

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """(Re)tie the LM head to the input embeddings; needed after moving a meta-built model."""
        if self.tied:
            self.lm_head.weight = self.input_embeddings().weight

    def hf_name(self, name: str) -> str | None:
        """The parameter name a checkpoint tensor name maps to (None: not a parameter, skip it)."""
        return None if name.endswith("rotary_emb.inv_freq") else name

    def parameter_table(self) -> dict[str, nn.Parameter]:
        """Every parameter by HF name; a tied matrix appears under both of its names."""
        return dict(self.named_parameters(remove_duplicate=False))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def after_load(self) -> None:
        """Rebuild derived buffers (rotary tables, packed weights) once the weights are on their device."""
        self.after_weights_changed()

    def after_weights_changed(self) -> int:
        """Re-pack the linear layers whose weights were written since they were packed (see
        serving/layers/linear.py); returns how many were. `write_weights` calls it, so every weight write
        that goes through it (a push, a LoRA merge, a TP rank's slice) is covered; code that writes
        parameters some other way must call it after. Forgetting is slow, not wrong: a packed layer also
        checks its weights' version counters on every call."""
        return repack_stale(self)

    def check_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Pair each tensor with its parameter, raising FieldError naming the first bad one; writes nothing."""
        table = self.parameter_table()
        pairs = []
        for raw_name, tensor in named_tensors:
            name = self.hf_name(raw_name)
            if name is None:
                continue
            param = table.get(name)
            if param is None:
                raise FieldError(raw_name, f"unknown parameter for {type(self).__name__}")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise FieldError(raw_name, f"must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise FieldError(raw_name, f"shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
            pairs.append((param, tensor))
        return pairs

    @torch.no_grad()
    def write_weights(self, pairs: list[tuple[nn.Parameter, torch.Tensor]], repack: bool = True) -> None:
        for param, tensor in pairs:
            param.copy_(tensor.to(param.device, param.dtype))
        if repack:
            self.after_weights_changed()

    def load_checkpoint(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a whole checkpoint; every parameter must be covered (tied matrices by either name)."""
        table = self.parameter_table()
        loaded: set[int] = set()
        for name, tensor in named_tensors:
            if self.hf_name(name) is not None and self.hf_name(name) not in table:
                logger.warning("checkpoint tensor %s is not a parameter of %s; ignored", name, type(self).__name__)
                continue
            pairs = self.check_weights([(name, tensor)])
            self.write_weights(pairs, repack=False)       # packed once, by after_load below
            loaded.update(id(param) for param, _ in pairs)
        missing = [n for n, p in table.items() if id(p) not in loaded]
        if missing:
            raise ConfigError("model", f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.after_load()
