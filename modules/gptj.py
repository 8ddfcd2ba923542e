"""GPT-J: one block with Hugging Face's submodule names.

Attention and MLP both read the same `ln_1` output and are added to the residual in parallel; q/k/v/out have no
bias; rotary is the interleaved (rotate-every-two) layout over the first `rotary_dim` dims of each head, base 10000.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import activation, apply_rotary, causal_attention
from .tiled_mlp import mlp_forward

PREFIX, EMBED, LAYERS, FINAL_NORM, HEAD = "transformer", "wte", "h", "ln_f", "lm_head"
HEAD_BIAS = True
INTERLEAVED_ROTARY = True


def final_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.out_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, mask=None):
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(shape).transpose(1, 2), cos, sin, INTERLEAVED_ROTARY)
        k = apply_rotary(self.k_proj(x).view(shape).transpose(1, 2), cos, sin, INTERLEAVED_ROTARY)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return self.out_proj(causal_attention(q, k, v, mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(h, cos, sin, mask) + mlp_forward(self.mlp, h) + x
