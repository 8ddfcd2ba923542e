"""Sums a stage's gradients over its data-parallel group while the backward still runs.

Every trained parameter's .grad is a view into one of a few flat buffers (buckets.py), so the backward accumulates
straight into them. A post-accumulate-grad hook counts each parameter's gradients; when the last micro-batch's has
arrived (accumulation x micro-batches per optimizer step) the parameter is final, and when every parameter of a
bucket is, the bucket's collective is launched asynchronously: an all-reduce (allreduce: every replica gets the
sums), or a reduce-scatter (sharded: each rank gets the sums of its own shard of the bucket). Buckets are launched in
their fixed order only, whatever the order the hooks fire in, so every replica issues the same collectives in the
same order. finish() launches what is left (late buckets; a parameter that got fewer gradients than expected, which
keeps its zeros or partial sum) and waits for all of them.

The loss is already divided by the global loss-token count (all replicas included), so the replicas' gradients are
summed, not averaged: the sum is the gradient of the global mean loss. Reduce-scatter gives the same sums as the
all-reduce, element by element.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist

from data_parallel.buckets import Piece, plan_buckets, shard_pieces

BUCKET_BYTES = 64 * 1024 * 1024


class GradientReducer:
    """The gradient buckets of one rank's trained `params` and their collectives over the data-parallel `group`.
    `backwards_per_step`: the gradients each parameter receives per optimizer step; `align`: where parameters and
    shards may start in a bucket (8-bit Adam's blocks); `late`: indices reduced only by finish()."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        group: dist.ProcessGroup | None,
        dp_size: int,
        dp_rank: int,
        sharded: bool,
        backwards_per_step: int,
        bucket_bytes: int = BUCKET_BYTES,
        align: int = 1,
        late: Collection[int] = frozenset(),
    ) -> None:
        for p in params:
            if not p.is_contiguous():
                raise ValueError("data-parallel gradient buckets need contiguous parameters")
        self.params, self.group, self.dp_rank, self.sharded = params, group, dp_rank, sharded
        self.backwards_per_step = backwards_per_step
        self.buckets = plan_buckets(params, dp_size, bucket_bytes, align, late)
        self.buffers = [torch.zeros(b.numel, dtype=b.dtype, device=params[b.indices[0]].device) for b in self.buckets]
        self.grad_views: dict[int, torch.Tensor] = {}  # param index -> its .grad, a view into its bucket
        self.bucket_of: dict[int, int] = {}  # param index -> bucket index
        for k, (bucket, buffer) in enumerate(zip(self.buckets, self.buffers)):
            for i, offset, n in zip(bucket.indices, bucket.offsets, bucket.numels):
                self.grad_views[i] = buffer[offset : offset + n].view(params[i].shape)
                self.bucket_of[i] = k
        # Sharded: this rank's summed shard of each bucket lands in place, in its own part of the bucket (no second
        # buffer: 2/dp bytes per parameter saved), and the pieces of my_pieces() are views of it.
        self.shard_sums: list[torch.Tensor] = []
        self.piece_sums: list[torch.Tensor] = []
        if sharded:
            for bucket, buffer in zip(self.buckets, self.buffers):
                self.shard_sums.append(buffer[dp_rank * bucket.shard : (dp_rank + 1) * bucket.shard])
                self.piece_sums += [buffer[f : f + end - start] for _, start, end, f in bucket.shard_pieces(dp_rank)]
        self.launched_in_backward = 0  # how many buckets the last step launched before finish()
        self._reset()
        for i, p in enumerate(params):
            if i not in late:
                p.register_post_accumulate_grad_hook(lambda _, i=i: self._accumulated(i))
        self.zero_grad()

    def my_pieces(self) -> list[Piece]:
        """This rank's shard: [(param index, start, end)] over flattened parameters, in bucket order."""
        return shard_pieces(self.buckets, self.dp_rank)

    def _reset(self) -> None:
        self.counts: list[int] = [0] * len(self.params)
        self.waiting: list[int] = [len(b.indices) for b in self.buckets]  # parameters not yet final
        self.works: list[dist.Work] = []

    def zero_grad(self) -> None:
        """Zero the buckets and point every .grad back at its view (the optimizer may have dropped some)."""
        for buffer in self.buffers:
            buffer.zero_()
        for i, p in enumerate(self.params):
            p.grad = self.grad_views[i]

    def _accumulated(self, i: int) -> None:
        """Hook: parameter i's gradient of one backward has been added to its view."""
        self.counts[i] += 1
        if self.counts[i] > self.backwards_per_step:
            raise RuntimeError(
                f"parameter {i} received {self.counts[i]} gradients in one optimizer step, "
                f"{self.backwards_per_step} expected: its bucket was already reduced"
            )
        if self.counts[i] == self.backwards_per_step:
            if self.params[i].grad.data_ptr() != self.grad_views[i].data_ptr():
                raise RuntimeError(f"parameter {i}'s gradient is not in its data-parallel bucket (.grad was replaced)")
            self.waiting[self.bucket_of[i]] -= 1
            while self._launchable(len(self.works)):
                self._launch(len(self.works))

    def _launchable(self, k: int) -> bool:
        """Bucket k is next in the fixed order and ready (late buckets wait for finish())."""
        return k < len(self.buckets) and not self.buckets[k].late and self.waiting[k] == 0

    def _launch(self, k: int) -> None:
        if self.sharded:
            work = dist.reduce_scatter_tensor(self.shard_sums[k], self.buffers[k], group=self.group, async_op=True)
        else:
            work = dist.all_reduce(self.buffers[k], group=self.group, async_op=True)
        self.works.append(work)

    def finish(self) -> list[torch.Tensor]:
        """Launch the buckets still waiting, in order, and wait for all. Allreduce: every .grad holds the sum over
        the replicas. Sharded: returns the summed gradient of each of my_pieces() (views of this rank's part of the
        buckets, valid until all_gather()); the rest of the .grad views then holds unreduced values, not to be used."""
        self.launched_in_backward = len(self.works)
        while len(self.works) < len(self.buckets):
            self._launch(len(self.works))
        for work in self.works:
            work.wait()
        self._reset()
        return self.piece_sums

    @torch.no_grad()
    def all_gather(self) -> None:
        """Sharded: every rank's shard of the parameters (already updated in place by its owner) into every replica.
        The gradient buckets are the landing buffers, so the step allocates one shard per bucket, not a full copy;
        the .grad views hold parameters afterwards, until zero_grad()."""
        for bucket, buffer in zip(self.buckets, self.buffers):
            mine = torch.zeros(bucket.shard, dtype=bucket.dtype, device=buffer.device)
            lo = self.dp_rank * bucket.shard
            for i, start, end, f in bucket.shard_pieces(self.dp_rank):
                mine[f - lo : f - lo + end - start].copy_(self.params[i].view(-1)[start:end])
            dist.all_gather_into_tensor(buffer, mine, group=self.group)
            torch._foreach_copy_(
                [self.params[i].view(-1) for i in bucket.indices],
                [buffer[offset : offset + n] for offset, n in zip(bucket.offsets, bucket.numels)],
            )
