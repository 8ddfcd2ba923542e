"""Gradient all-reduce over the data-parallel group, in a few flattened buckets, once per optimizer step.

The loss is already divided by the global loss-token count (all replicas included), so the replicas' gradients are
summed, not averaged: the sum is the gradient of the global mean loss.
"""

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 64 * 1024 * 1024


def _buckets(tensors, bucket_bytes):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def allreduce_gradients(parameters, group, group_size, bucket_bytes=BUCKET_BYTES):
    """Sum .grad of `parameters` over `group`. A parameter without a gradient gets zeros, so every replica
    launches the same collectives."""
    if group_size == 1:
        return
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)
