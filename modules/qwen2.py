"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v but not on o, a large rotary base, and a head tied
to the embedding on the small sizes; with `use_sliding_window` the layers from `max_window_layers` on slide
(`layer_types`, the stage's mask).
"""

from __future__ import annotations

from .decoder import EMBED, FINAL_NORM, HEAD, HEAD_BIAS, INTERLEAVED_ROTARY, LAYERS, PREFIX, Block, final_norm

__all__ = ["EMBED", "FINAL_NORM", "HEAD", "HEAD_BIAS", "INTERLEAVED_ROTARY", "LAYERS", "PREFIX", "Block", "final_norm"]
