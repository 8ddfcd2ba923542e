"""Llama (Llama 2/3, Llama-2-7B-32K and kin): the decoder block as it is (modules/decoder.py).

Pre-norm RMSNorm, SwiGLU MLP, grouped-query attention (`num_key_value_heads` < `num_attention_heads`), rotate-half
rotary with `rope_theta` and optional linear / llama3 scaling (handled in `layers.rotary_inv_freq`).
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
