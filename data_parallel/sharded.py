"""Sharded optimizer state (ZeRO-1, --dp-mode sharded): the flat layout of a stage's parameters and its collectives.

The trained parameters of a stage are laid end to end in one flat index space per dtype (in the optimizer's order),
padded to a multiple of dp and cut into dp contiguous shards: data-parallel rank r owns elements [r*S, (r+1)*S). A
shard meets a parameter in at most one contiguous piece, so the optimizer steps pieces `(param index, start, end)`
of flattened parameters, and its state is the same element-wise maths on fewer elements.

With `align` > 1 every parameter starts at a multiple of `align` in the flat space and S is a multiple of `align`
too, so every piece starts at a multiple of `align` of its own parameter's elements: a block-wise optimizer state
(8-bit Adam: one scale per 256 elements) then never has a block cut between two ranks. The gaps between parameters
are padding: zeros into the reduce-scatter, ignored by the all-gather.

Per step: gradients are reduce-scattered (each rank receives the sum over replicas of its own shard, in buckets of
BUCKET_BYTES) and the full gradients are dropped; after the step each rank's updated pieces are all-gathered into
every replica's parameters. Summing with reduce-scatter gives the same sums as the all-reduce of allreduce.py (the
loss is already divided by the global token count: sums, not means).
"""

import torch
import torch.distributed as dist

from data_parallel.allreduce import BUCKET_BYTES


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class _FlatGroup:
    """Parameters of one dtype, flattened in order (each starting at a multiple of `align`) and cut into `dp` shards
    of `shard` elements (a multiple of `align`)."""

    def __init__(self, indices, numels, dtype, dp_size, align):
        self.indices, self.numels, self.dtype = indices, numels, dtype
        self.offsets, end = [], 0
        for n in numels:
            self.offsets.append(_round_up(end, align))
            end = self.offsets[-1] + n
        self.shard = _round_up(-(-end // dp_size), align)  # ceil: the last shard is padded

    def pieces(self, lo, hi):
        """(param index, start, end, flat start) of every parameter overlapping flat range [lo, hi)."""
        out = []
        for k, i in enumerate(self.indices):
            a, b = max(lo, self.offsets[k]), min(hi, self.offsets[k] + self.numels[k])
            if a < b:
                out.append((i, a - self.offsets[k], b - self.offsets[k], a))
        return out


class FlatShards:
    """Where each data-parallel rank's shard lies in a stage's parameters, and the two collectives over them."""

    def __init__(self, params, dp_size, dp_rank, bucket_bytes=BUCKET_BYTES, align=1):
        for p in params:
            if not p.is_contiguous():
                raise ValueError("--dp-mode sharded needs contiguous parameters")
        self.dp_size, self.dp_rank, self.bucket_bytes = dp_size, dp_rank, bucket_bytes
        by_dtype = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self.groups = [
            _FlatGroup(ix, [params[i].numel() for i in ix], dt, dp_size, align) for dt, ix in by_dtype.items()
        ]

    def my_pieces(self):
        """This rank's pieces: [(param index, start, end)] over flattened parameters (per dtype group, in order)."""
        out = []
        for g in self.groups:
            lo = self.dp_rank * g.shard
            out += [(i, a, b) for i, a, b, _ in g.pieces(lo, lo + g.shard)]
        return out

    def _chunks(self, g):
        step = max(1, self.bucket_bytes // (self.dp_size * g.dtype.itemsize))
        return [(k, min(k + step, g.shard)) for k in range(0, g.shard, step)]

    @staticmethod
    def _copy_range(g, tensors, lo, hi, dst):
        """dst[:] = flat elements [lo, hi) of `tensors` (None, padding and the gaps of `align`: zeros)."""
        if hi - lo > sum(b - a for _, a, b, _ in g.pieces(lo, hi)):
            dst.zero_()
        for i, a, b, f in g.pieces(lo, hi):
            t = tensors[i]
            if t is None:
                dst[f - lo : f - lo + b - a].zero_()
            else:
                dst[f - lo : f - lo + b - a].copy_(t.view(-1)[a:b])

    def reduce_scatter(self, params, group):
        """Sum the gradients over `group`, keeping this rank's shard only; every .grad is dropped. Returns the
        summed gradient of each of my_pieces(), in order (views of one buffer per dtype)."""
        out = []
        for g in self.groups:
            device = params[g.indices[0]].device
            mine = torch.empty(g.shard, dtype=g.dtype, device=device)
            grads = {i: params[i].grad for i in g.indices}
            for k0, k1 in self._chunks(g):
                staging = torch.empty(self.dp_size, k1 - k0, dtype=g.dtype, device=device)
                for r in range(self.dp_size):
                    self._copy_range(g, grads, r * g.shard + k0, r * g.shard + k1, staging[r])
                dist.reduce_scatter_tensor(mine[k0:k1], staging.view(-1), group=group)
            for i in g.indices:
                params[i].grad = None
            lo = self.dp_rank * g.shard
            out += [mine[f - lo : f - lo + b - a] for _, a, b, f in g.pieces(lo, lo + g.shard)]
        return out

    @torch.no_grad()
    def all_gather(self, params, group):
        """Every rank's shard of the parameters (already updated in place by its owner) into every replica."""
        for g in self.groups:
            device = params[g.indices[0]].device
            tensors = {i: params[i] for i in g.indices}
            me = self.dp_rank
            for k0, k1 in self._chunks(g):
                n = k1 - k0
                local = torch.empty(n, dtype=g.dtype, device=device)
                self._copy_range(g, tensors, me * g.shard + k0, me * g.shard + k1, local)
                gathered = torch.empty(self.dp_size * n, dtype=g.dtype, device=device)
                dist.all_gather_into_tensor(gathered, local, group=group)
                for r in range(self.dp_size):
                    if r == me:
                        continue
                    lo = r * g.shard + k0
                    for i, a, b, f in g.pieces(lo, lo + n):
                        params[i].view(-1)[a:b].copy_(gathered[r * n + f - lo : r * n + f - lo + b - a])
