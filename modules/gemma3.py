"""Gemma 3 (text, `gemma3_text`): Gemma 2 with per-head q/k norms (`qk_norm`) instead of attention soft-capping,
five sliding layers to one global (`layer_types`), and the sliding layers' own rotary base (`local_rope_theta`;
the global layers may scale theirs).
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
