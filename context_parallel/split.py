"""Which tokens of a sequence a context-parallel rank holds, and the batch cut down to them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextSplit:
    size: int  # ranks splitting a sequence
    rank: int  # this rank's place among them
    group: object  # their process group

    def local_index(self, seq: int, device=None, rank: int | None = None) -> torch.Tensor:
        """Positions (0..seq-1) of the tokens rank `rank` (default: this one) holds, in its order: chunk r, then
        chunk 2C - 1 - r, of 2C chunks of seq / 2C tokens."""
        rank = self.rank if rank is None else rank
        chunk = seq // (2 * self.size)
        early = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
        late = torch.arange((2 * self.size - 1 - rank) * chunk, (2 * self.size - rank) * chunk, device=device)
        return torch.cat([early, late])

    def key_index(self, seq: int, device=None) -> torch.Tensor:
        """Positions of the tokens of a gathered sequence: every rank's own tokens, rank after rank."""
        return torch.cat([self.local_index(seq, device, r) for r in range(self.size)])

    def split(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's tokens of a [B, S, ...] batch tensor."""
        if tensor is None:
            return None
        return tensor.index_select(1, self.local_index(tensor.shape[1], tensor.device))


def attach_context(stages, layout) -> ContextSplit | None:
    """Under --context-parallel-size > 1, every stage of this rank attends across its cp group; the split of its
    batches, else None."""
    if layout.cp_size == 1:
        return None
    context = ContextSplit(layout.cp_size, layout.cp_rank, layout.cp_group)
    for stage in stages:
        stage.context = context
    return context
