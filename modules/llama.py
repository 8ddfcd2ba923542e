"""Llama (Llama-2-7B-32K and kin): one block with Hugging Face's submodule names.

Pre-norm RMSNorm, SwiGLU MLP, grouped-query attention (`num_key_value_heads` < `num_attention_heads`), rotate-half
rotary with `rope_theta` and optional linear / llama3 scaling (handled in `layers.rotary_inv_freq`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, activation, apply_rotary, causal_attention

PREFIX, EMBED, LAYERS, FINAL_NORM, HEAD = "model", "embed_tokens", "layers", "norm", "lm_head"
HEAD_BIAS = False
INTERLEAVED_ROTARY = False


def final_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, INTERLEAVED_ROTARY)
        k = apply_rotary(k, cos, sin, INTERLEAVED_ROTARY)
        return self.o_proj(causal_attention(q, k, v, mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))
