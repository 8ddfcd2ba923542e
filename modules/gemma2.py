"""Gemma 2: embeddings times sqrt(hidden) (`embed_scale`), RMSNorm scaling by (1 + weight) (`norm_offset`), norms
before and after attention and MLP (`sandwich_norms`), GeGLU with tanh GELU, queries scaled by
`query_pre_attn_scalar` ** -0.5, attention and final logits soft-capped (cap * tanh(x / cap)), sliding and global
layers alternating (`layer_types`), a tied head over a 256k vocabulary.
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
