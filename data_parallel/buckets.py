"""Where each trained parameter's gradient lies in a stage's flat gradient buckets, and which part of every bucket a
data-parallel rank owns under --dp-mode sharded. Arithmetic only: reducer.py owns the buffers and the collectives.

Parameters are taken in the order their gradients become final, the reverse of the forward order (backward runs from
the last layer to the first), and grouped into buckets of one dtype and about `bucket_bytes`; a larger parameter is a
bucket alone. Parameters reduced only after the backward (`late`: tied embeddings, summed over the pipeline ends
first) come last, in buckets of their own, so that no bucket waits for them.

In a bucket's flat buffer every parameter starts at a multiple of `align`, and the buffer is padded to a multiple of
dp * align and cut into dp equal shards: data-parallel rank r owns elements [r*S, (r+1)*S) of every bucket. A shard
meets a parameter in at most one contiguous piece (a parameter lies in one bucket), so the sharded optimizer steps
pieces `(param index, start, end)` of flattened parameters. With align > 1 every piece starts at a multiple of align
of its parameter's elements: a block-wise optimizer state (8-bit Adam: one scale per 256 elements) never has a block
cut between two ranks. The gaps between parameters are padding: zeros.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

# (param index, start, end): elements [start, end) of a flattened parameter
Piece = tuple[int, int, int]
# a Piece and where it lies in its bucket's flat buffer
BucketPiece = tuple[int, int, int, int]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Bucket:
    dtype: torch.dtype
    late: bool  # reduced only after the backward
    indices: list[int] = field(default_factory=list)  # parameter indices, in flat order
    offsets: list[int] = field(default_factory=list)  # where each parameter starts in the flat buffer
    numels: list[int] = field(default_factory=list)
    numel: int = 0  # the padded length: dp shards of `shard` elements
    shard: int = 0

    def shard_pieces(self, dp_rank: int) -> list[BucketPiece]:
        """(param index, start, end, position in the bucket) of every parameter overlapping rank dp_rank's shard."""
        lo, hi = dp_rank * self.shard, (dp_rank + 1) * self.shard
        out: list[BucketPiece] = []
        for i, offset, n in zip(self.indices, self.offsets, self.numels):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                out.append((i, a - offset, b - offset, a))
        return out


def plan_buckets(
    params: Sequence[torch.Tensor],
    dp_size: int,
    bucket_bytes: int,
    align: int = 1,
    late: Collection[int] = frozenset(),
) -> list[Bucket]:
    """The buckets of `params` (tensors; `late`: indices reduced after the backward)."""
    order = [i for i in reversed(range(len(params))) if i not in late] + sorted(late)
    buckets: list[Bucket] = []
    size = 0
    for i in order:
        p = params[i]
        nbytes = p.numel() * p.element_size()
        last = buckets[-1] if buckets else None
        full = size > 0 and size + nbytes > bucket_bytes
        if last is None or full or last.dtype != p.dtype or last.late != (i in late):
            last, size = Bucket(p.dtype, i in late), 0
            buckets.append(last)
        offset = round_up(last.numel, align)
        last.indices.append(i)
        last.offsets.append(offset)
        last.numels.append(p.numel())
        last.numel = offset + p.numel()
        size += nbytes
    for bucket in buckets:
        bucket.numel = round_up(bucket.numel, dp_size * align)
        bucket.shard = bucket.numel // dp_size
    return buckets


def shard_pieces(buckets: Sequence[Bucket], dp_rank: int) -> list[Piece]:
    """This rank's pieces [(param index, start, end)] over flattened parameters, bucket by bucket."""
    return [(i, a, b) for bucket in buckets for i, a, b, _ in bucket.shard_pieces(dp_rank)]
