"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with fused projections under Hugging Face's names: `qkv_proj`
(rows: q heads, then k, then v) and `gate_up_proj` (rows: gate, then up), partial rotary (`partial_rotary_factor`),
and a sliding window on every layer when the config sets one. Long-context rope scaling (`longrope`) is refused by
config.py.
"""

from __future__ import annotations

import torch
from torch import nn

from . import decoder
from .config import ModelConfig
from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]


class Attention(decoder.Attention):
    def _projections(self, cfg: ModelConfig) -> None:
        rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, rows, bias=cfg.attention_bias)
        self.split = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x).split(self.split, dim=-1)


class MLP(decoder.MLP):
    def _projections(self, cfg: ModelConfig) -> None:
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return gate, up


class Block(decoder.Block):
    attention_type, mlp_type = Attention, MLP
