"""Mistral (and Mistral-Nemo's explicit `head_dim`): the Llama block; every layer attends within a sliding window
of `sliding_window` positions when the config sets one (the stage's mask, composed with document masks).
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
