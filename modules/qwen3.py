"""Qwen3 (dense): the Llama block with an RMSNorm over each head of q and k before rotary (`qk_norm`), `head_dim`
set apart from hidden / heads, biases as `attention_bias` says, a tied head on the small sizes.
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
