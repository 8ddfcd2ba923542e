"""--tiled-mlp on: each block's MLP runs TILE_TOKENS tokens at a time, each tile checkpointed.

At long sequences the MLP's intermediates are a block's largest activations: gate, up, the activation and their
product, about 4 x the intermediate size values per token (3.5 x the hidden size each at Llama-3: 14 GB of bf16 at
128k tokens), held for the MLP's backward, and held again while a checkpointed block is recomputed. Tiled, a tile's
intermediates exist only while that tile runs, in the forward and again in its backward, so they cost one tile's
worth whatever the length. The price is one more forward of the MLP per token. Each token's MLP is independent of
the others, so the values are the untiled ones (up to the matmul's summation order on a shorter input).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

TILE_TOKENS = 8192  # 8192 x 14336 bf16 values are 235 MB per intermediate at Llama-3


def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) for x [..., hidden], a tile of tokens at a time where the stage tiles its MLPs (`mlp.tile_tokens`)."""
    tile = getattr(mlp, "tile_tokens", 0)
    if not tile or x.shape[:-1].numel() <= tile:
        return mlp(x)
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled():
        parts = [torch.utils.checkpoint.checkpoint(mlp, part, use_reentrant=False) for part in flat.split(tile)]
    else:
        parts = [mlp(part) for part in flat.split(tile)]
    return torch.cat(parts).view(*x.shape[:-1], -1)


def tile_mlps(blocks, tokens: int = TILE_TOKENS) -> None:
    """Tile the MLP of each of `blocks` (a plain attribute: copies of the stage keep it)."""
    for block in blocks:
        block.mlp.tile_tokens = tokens
