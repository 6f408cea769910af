"""GPT-2: learned positions, Conv1D weights stored [in, out] (transposed vs nn.Linear), gelu_new, tied LM head."""

from __future__ import annotations

import torch
from torch import nn

from serving.layers.activations import get_activation
from serving.layers.attention import AttentionMetadata, paged_attention
from serving.layers.linear import Conv1D, PackedLinear
from serving.models.base import CausalLM, Shard


class GPT2Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, dim // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)
        self.qkv = PackedLinear(self, ("c_attn",), transposed=True)
        self.out = PackedLinear(self, ("c_proj",), transposed=True)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return self.out(paged_attention(q, k.contiguous(), v.contiguous(), kv_cache, meta, scale=self.scaling))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.hidden_size
        self.c_fc = Conv1D(cfg.hidden_size, inner)
        self.c_proj = Conv1D(inner, cfg.hidden_size)
        self.act = get_activation(cfg.activation_function)
        self.fc = PackedLinear(self, ("c_fc",), transposed=True)
        self.proj = PackedLinear(self, ("c_proj",), transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GPT2Block(nn.Module):
    """Pre-LayerNorm block: attention then MLP, each with a residual."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 over the flat ragged batch; parameter names as in HF GPT2LMHeadModel."""

    # Conv1D stores [in, out]: column-parallel splits dim 1, row-parallel dim 0; c_attn is q|k|v fused
    tp_plan = ((r"\.attn\.c_attn\.weight$", Shard(1, False, 3)), (r"\.attn\.c_attn\.bias$", Shard(0, False, 3)),
               (r"\.mlp\.c_fc\.weight$", Shard(1, False)), (r"\.mlp\.c_fc\.bias$", Shard(0, False)),
               (r"\.c_proj\.weight$", Shard(0, True)))

    def __init__(self, cfg):
        super().__init__()
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def hf_name(self, name: str) -> str | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            return None
        if not name.startswith(("transformer.", "lm_head.")):  # checkpoints saved from GPT2Model
            name = "transformer." + name
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block, kv_cache in zip(t.h, kv_caches):
            x = block(x, meta, kv_cache)
        return t.ln_f(x)
