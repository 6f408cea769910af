"""Tensor parallelism as one rewrite of a serving model (Megatron-style, in the spirit of gpt-fast's tp.py).

The sharding rule, by HF parameter name, as each model family declares it in its `tp_plan`
(serving/models/*.py; rank r of N keeps slice r of N, contiguous):

- column-parallel (output features split): q/k/v projections, gate_proj/up_proj, OPT's fc1, GPT-2's
  c_fc, and GPT-2's fused c_attn (its q, k and v parts each split). Query heads AND KV heads are split:
  rank r keeps query heads [r*H/N, (r+1)*H/N) and KV heads [r*Hkv/N, (r+1)*Hkv/N), which are exactly
  the KV heads of those query heads under GQA, so attention runs locally on each rank's heads and each
  rank's KV cache holds only its Hkv/N heads. Biases of column-parallel layers are split the same way.
- row-parallel (input features split): o_proj, OPT's out_proj and fc2, down_proj, GPT-2's c_proj
  (attention and MLP). Each rank computes a partial product, then ONE all_reduce sums them (one after
  attention, one after the MLP); the bias, replicated, is added once after the reduce.
- replicated: everything else — token and position embeddings, norms, OPT's project_in/out, and the LM
  head (so the logits need no gather; only rank 0 samples from them). On CPU this costs vocab x hidden
  per rank, which is the stated trade: simple and exact.

A model is refused at start (ConfigError naming "tp") unless N divides its query heads, KV heads and
MLP size. `shard_for_rank` is the single slicing rule, used both when a rank loads its checkpoint
shard and when a weight update is split across ranks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError, FieldError
from serving.models.base import Shard, TPPlan


@functools.cache
def _compiled(plan: TPPlan) -> tuple[tuple[re.Pattern, Shard], ...]:
    return tuple((re.compile(pattern), shard) for pattern, shard in plan)


def layout_of(plan: TPPlan, name: str) -> Shard | None:
    """How the HF parameter `name` is sharded under a model family's `tp_plan`; None: replicated."""
    for pattern, layout in _compiled(plan):
        if pattern.search(name):
            return layout
    return None


def shard_for_rank(plan: TPPlan, name: str, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full HF tensor `name` (the tensor itself when replicated or world == 1)."""
    layout = layout_of(plan, name)
    if layout is None or world == 1:
        return tensor
    size = tensor.shape[layout.dim] if tensor.dim() > layout.dim else 0
    if size % (layout.parts * world):
        raise FieldError(name, f"dimension {layout.dim} of shape {tuple(tensor.shape)} does not split into "
                               f"{layout.parts * world} equal parts (tp={world})")
    parts = tensor.chunk(layout.parts, layout.dim)
    return torch.cat([p.chunk(world, layout.dim)[rank] for p in parts], layout.dim).contiguous()


def unshard(plan: TPPlan, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full HF tensor from every rank's shard (index = rank): the inverse of `shard_for_rank`."""
    layout = layout_of(plan, name)
    if layout is None or len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(layout.parts, layout.dim) for s in shards]
    return torch.cat([torch.cat([p[k] for p in pieces], layout.dim) for k in range(layout.parts)], layout.dim)


def full_shape(plan: TPPlan, name: str, local_shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    """The full HF shape of a parameter from one rank's shard shape."""
    layout = layout_of(plan, name)
    if layout is None or world == 1:
        return tuple(local_shape)
    shape = list(local_shape)
    shape[layout.dim] *= world
    return tuple(shape)


def tp_sizes(hf_config) -> dict[str, int]:
    """The counts tensor parallelism splits: query heads, KV heads, MLP width."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    mlp = (getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "ffn_dim", None)
           or getattr(hf_config, "n_inner", None) or 4 * hf_config.hidden_size)
    return {"query heads": heads, "kv heads": kv_heads, "intermediate size": mlp}


def check_tensor_parallel(hf_config, world: int) -> None:
    """Refuse a tp degree that does not divide the model's head counts and MLP width."""
    if world < 1:
        raise ConfigError("tp", f"must be >= 1, got {world}")
    sizes = tp_sizes(hf_config)
    bad = {k: v for k, v in sizes.items() if v % world}
    if bad:
        counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ConfigError("tp", f"tp={world} must divide the model's {counts}; "
                                f"not divisible by {world}: {', '.join(bad)}")


class RowParallel(nn.Module):
    """A row-parallel linear layer under the replaced module's HF names: partial product, all_reduce, bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_dim: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.input_dim = input_dim   # 1 for nn.Linear [out, in], 0 for Conv1D [in, out]
        self.group = group           # serving.parallel.group.TPGroup: all_reduce(tensor) sums in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t() if self.input_dim == 1 else x @ self.weight
        self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias


def apply_tensor_parallel(model: nn.Module, rank: int, world: int, group) -> nn.Module:
    """Rewrite `model` in place for rank `rank` of `world` (row-parallel layers reduce over `group`, a
    serving.parallel.group.TPGroup): shard the linear layers by the rule above and divide every attention
    module's head counts. Works on a meta-device model (before loading a sharded checkpoint) as well as
    on a loaded one (its weights are sliced)."""
    if world == 1:
        return model
    for prefix, module in list(model.named_modules()):
        for attr in ("num_heads", "num_kv_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, getattr(module, attr) // world)
        weight = getattr(module, "weight", None)
        layout = layout_of(model.tp_plan, f"{prefix}.weight") if isinstance(weight, nn.Parameter) else None
        if layout is None:
            continue
        bias = getattr(module, "bias", None)
        shard_w = shard_for_rank(model.tp_plan, f"{prefix}.weight", weight.data, rank, world)
        if layout.row:
            parent_name, _, child = prefix.rpartition(".")
            replacement = RowParallel(shard_w, None if bias is None else bias.data, layout.dim, group)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            continue
        module.weight = nn.Parameter(shard_w, requires_grad=False)
        if isinstance(bias, nn.Parameter):
            bias_shard = shard_for_rank(model.tp_plan, f"{prefix}.bias", bias.data, rank, world)
            module.bias = nn.Parameter(bias_shard, requires_grad=False)
        if isinstance(module, nn.Linear):
            module.out_features = shard_w.shape[0]
    return model


def load_sharded_model(path: str | Path, dtype: torch.dtype, device: torch.device, rank: int, world: int, group):
    """Build rank `rank`'s shard of the checkpoint at `path`: (model, hf_config). The full model is never
    materialised: the model is built on the meta device, rewritten, then fed one sliced tensor at a time."""
    from common.checkpoint import iter_checkpoint
    from serving.models import model_class, read_hf_config

    hf_config = read_hf_config(path)
    check_tensor_parallel(hf_config, world)
    with torch.device("meta"):
        model = model_class(hf_config)(hf_config)
    apply_tensor_parallel(model, rank, world, group)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.load_checkpoint((name, shard_for_rank(model.tp_plan, model.hf_name(name) or name, tensor, rank, world))
                          for name, tensor in iter_checkpoint(Path(path)))
    return model.eval().requires_grad_(False), hf_config


def sharded_parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's sharded parameters, bytes of its replicated ones); tied matrices counted once."""
    sharded = replicated = 0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if layout_of(model.tp_plan, name) is not None:
            sharded += nbytes
        else:
            replicated += nbytes
    return sharded, replicated
