"""Llama family: RMSNorm, RoPE, GQA attention, SiLU-gated MLP, optionally tied embeddings."""

from __future__ import annotations

import torch
from torch import nn

from serving.layers import fused_kernels
from serving.layers.activations import get_activation
from serving.layers.attention import AttentionMetadata, paged_attention
from serving.layers.linear import PackedLinear
from serving.layers.norms import RMSNorm
from serving.layers.rotary import RotaryEmbedding, rope_settings
from serving.models.base import CausalLM, Shard


class LlamaAttention(nn.Module):
    """q/k/v projections, RoPE, paged attention (GQA: fewer KV heads than query heads)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.qkv = PackedLinear(self, ("q_proj", "k_proj", "v_proj"))   # one packed call for q, k and v
        self.out = PackedLinear(self, ("o_proj",))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(q, k, rope)
        return self.out(paged_attention(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        act = getattr(cfg, "hidden_act", "silu")
        self.act = get_activation(act)
        self.silu = act in ("silu", "swish")      # act(gate) * up in one pass (fused_kernels.silu_mul)
        self.gate_up = PackedLinear(self, ("gate_proj", "up_proj"))
        self.down = PackedLinear(self, ("down_proj",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(fused_kernels.silu_mul(gate, up) if self.silu else self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, rope, meta, kv_cache):
        """x: the previous layer's MLP output (the embeddings for the first layer, with residual None).
        Returns this layer's MLP output and the residual stream before it: the next norm adds the two, in
        the same pass (as torch would, x + mlp, one rounded add), so no layer spends a pass on the add."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm(x, residual=residual)
        h = self.self_attn(h, rope, meta, kv_cache)
        residual, h = self.post_attention_layernorm(h, residual=residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        theta, _, factor = rope_settings(cfg)
        self.rotary_emb = RotaryEmbedding(head_dim, cfg.max_position_embeddings, theta, factor)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama over the flat ragged batch; parameter names as in HF LlamaForCausalLM."""

    # nn.Linear stores [out, in]: column-parallel splits dim 0, row-parallel dim 1
    tp_plan = ((r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$", Shard(0, False)),
               (r"\.(o_proj|down_proj)\.weight$", Shard(1, True)))

    def __init__(self, cfg):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def after_load(self) -> None:
        weight = self.model.embed_tokens.weight
        self.model.rotary_emb.build(weight.device, weight.dtype)
        super().after_load()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb.lookup(positions)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, rope, meta, kv_cache)
        return self.model.norm(x) if residual is None else self.model.norm(x, residual=residual)[1]
