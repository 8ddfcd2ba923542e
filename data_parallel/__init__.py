"""Data parallelism: reducer.py sums each stage's gradients over its data-parallel group while the backward runs
(all-reduce, or reduce-scatter under --dp-mode sharded, and the all-gather of the updated shards); buckets.py lays
the gradients out in buckets and cuts each bucket into one shard per data-parallel rank."""

from .reducer import GradientReducer

__all__ = ["GradientReducer"]
