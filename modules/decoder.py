"""The pre-norm decoder block of Llama and the families built like it (Qwen 2/3, Mistral, Gemma 2/3, Phi-3), with
Hugging Face's submodule names. A family is this block with the switches of its ModelConfig:

    q/k/v (and o) biases       attention_bias, o_bias        Qwen2: q/k/v only
    per-head q/k RMSNorm       qk_norm                       Qwen3, Gemma 3 (before rotary)
    sliding-window layers      layer_types, sliding_window   Mistral, Phi-3, Qwen (optional), Gemma (the stage's mask)
    query scale, soft-capping  attn_scale, attn_softcap      Gemma
    (1 + weight) RMSNorm       norm_offset                   Gemma
    norms after attn and MLP   sandwich_norms                Gemma: pre/post_feedforward_layernorm

Phi-3's fused projections (qkv_proj, gate_up_proj) are subclasses in phi3.py. Rotary, masks, the embedding scale and
the final soft-cap are the stage's (stage.py), shared by its blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, activation, apply_rotary, causal_attention
from .tiled_mlp import mlp_forward

PREFIX, EMBED, LAYERS, FINAL_NORM, HEAD = "model", "embed_tokens", "layers", "norm", "lm_head"
HEAD_BIAS = False
INTERLEAVED_ROTARY = False


def norm(cfg: ModelConfig, size: int | None = None) -> RMSNorm:
    return RMSNorm(size or cfg.hidden_size, cfg.norm_eps, offset=cfg.norm_offset)


def final_norm(cfg: ModelConfig) -> nn.Module:
    return norm(cfg)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self._projections(cfg)
        o_bias = cfg.attention_bias if cfg.o_bias is None else cfg.o_bias
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = norm(cfg, cfg.head_dim)
            self.k_norm = norm(cfg, cfg.head_dim)

    def _projections(self, cfg: ModelConfig) -> None:
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, INTERLEAVED_ROTARY)
        k = apply_rotary(k, cos, sin, INTERLEAVED_ROTARY)
        return self.o_proj(causal_attention(q, k, v, mask, self.scale, self.softcap))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._projections(cfg)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def _projections(self, cfg: ModelConfig) -> None:
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    attention_type, mlp_type = Attention, MLP

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = norm(cfg)
        self.self_attn = self.attention_type(cfg)
        self.post_attention_layernorm = norm(cfg)
        if cfg.sandwich_norms:  # post_attention_layernorm then closes the attention branch instead of opening the MLP's
            self.pre_feedforward_layernorm = norm(cfg)
            self.post_feedforward_layernorm = norm(cfg)
        self.mlp = self.mlp_type(cfg)
        self.sandwich = cfg.sandwich_norms

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        if self.sandwich:
            h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
            return h + self.post_feedforward_layernorm(mlp_forward(self.mlp, self.pre_feedforward_layernorm(h)))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + mlp_forward(self.mlp, self.post_attention_layernorm(h))
