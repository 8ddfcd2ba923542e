"""GPT-NeoX (Pythia, GPT-NeoXT-Chat-Base-20B, RedPajama-INCITE): one block, with Hugging Face's submodule names.

The query/key/value projection stays fused (one matmul); its output rows are laid out per head as
[heads, 3, head_dim], which is why the view below splits heads before q/k/v. Rotary is rotate-half style over the
first `rotary_dim` dims of each head (partial rotary, `rotary_pct`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import activation, apply_rotary, causal_attention
from .tiled_mlp import mlp_forward

# HF names of the stage's outer parts (see ARCHITECTURE.md); the blocks live at f"{PREFIX}.{LAYERS}.{i}".
PREFIX, EMBED, LAYERS, FINAL_NORM, HEAD = "gpt_neox", "embed_in", "layers", "final_layer_norm", "embed_out"
HEAD_BIAS = False
INTERLEAVED_ROTARY = False


def final_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask=None):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each [B, H, S, D]
        q = apply_rotary(q, cos, sin, INTERLEAVED_ROTARY)
        k = apply_rotary(k, cos, sin, INTERLEAVED_ROTARY)
        # v is a view of the whole qkv output; attention saves v for backward, so copy it out and let the 3x-larger
        # qkv buffer go (saves two hidden-sized activations per layer; measured 1.6 GB at Pythia-1.4B, mb 4).
        return self.dense(causal_attention(q, k, v.contiguous(), mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, mask)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return mlp_forward(self.mlp, self.post_attention_layernorm(x)) + attn + x
        h = attn + x  # sequential (RedPajama-INCITE): h = x + attn(ln1(x)); h + mlp(ln2(h))
        return mlp_forward(self.mlp, self.post_attention_layernorm(h)) + h
