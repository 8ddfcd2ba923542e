"""Per-tensor seeds: every initialised tensor draws from its own CPU generator seeded by (run seed, tensor name), so
its values do not depend on the pipeline layout, the device or the order tensors are drawn in. Base weights
(`weights.init_stage_weights`) and LoRA adapters (`lora.init_lora_weights`) both seed this way.
"""

from __future__ import annotations

import hashlib


def stable_seed(seed: int, name: str) -> int:
    """A non-negative 63-bit seed for tensor `name` of a run seeded `seed`; a hash, not Python's hash(), so every
    process and host agrees."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
