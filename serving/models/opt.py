"""OPT: learned positions (offset 2), pre- or post-LayerNorm (`do_layer_norm_before`), ReLU MLP,
optional `word_embed_proj_dim` projections, tied LM head."""

from __future__ import annotations

import torch
from torch import nn

from serving.layers.activations import get_activation
from serving.layers.attention import AttentionMetadata, paged_attention
from serving.layers.linear import PackedLinear
from serving.models.base import CausalLM, Shard

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, bias = cfg.hidden_size, bool(getattr(cfg, "enable_bias", True))
        self.num_heads, self.head_dim = cfg.num_attention_heads, dim // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.qkv = PackedLinear(self, ("q_proj", "k_proj", "v_proj"))
        self.out = PackedLinear(self, ("out_proj",))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        shape = (-1, self.num_heads, self.head_dim)
        q, k, v = self.qkv(x)
        q = (q * self.scaling).view(shape)  # OPT scales q before the product, as HF does
        k, v = k.view(shape), v.view(shape)
        return self.out(paged_attention(q, k, v, kv_cache, meta, scale=1.0))


class OPTDecoderLayer(nn.Module):
    """Attention and ReLU MLP, LayerNorm before (most sizes) or after (350m) each."""

    def __init__(self, cfg):
        super().__init__()
        dim, bias = cfg.hidden_size, bool(getattr(cfg, "enable_bias", True))
        affine = bool(getattr(cfg, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(cfg.do_layer_norm_before)
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.fc1 = nn.Linear(dim, cfg.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, dim, bias=bias)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.act = get_activation(cfg.activation_function)
        self.fc1_packed = PackedLinear(self, ("fc1",))
        self.fc2_packed = PackedLinear(self, ("fc2",))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, meta, kv_cache)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2_packed(self.act(self.fc1_packed(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, proj = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, dim)
        self.project_in = nn.Linear(proj, dim, bias=False) if proj != dim else None
        self.project_out = nn.Linear(dim, proj, bias=False) if proj != dim else None
        keep_final = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        affine = bool(getattr(cfg, "layer_norm_elementwise_affine", True))
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine) if keep_final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(CausalLM):
    """OPT over the flat ragged batch; parameter names as in HF OPTForCausalLM."""

    tp_plan = ((r"\.(q_proj|k_proj|v_proj|fc1)\.(weight|bias)$", Shard(0, False)),
               (r"\.(out_proj|fc2)\.weight$", Shard(1, True)))

    def __init__(self, cfg):
        super().__init__()
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def hf_name(self, name: str) -> str | None:
        if name.startswith("decoder."):  # checkpoints saved from OPTModel rather than OPTForCausalLM
            name = "model." + name
        return None if name.endswith(".version") else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(dec.layers, kv_caches):
            x = layer(x, meta, kv_cache)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return x
