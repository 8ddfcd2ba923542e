"""Data parallelism: allreduce.py sums each stage's gradients over its data-parallel group; sharded.py cuts the
optimizer's share of a stage into one shard per data-parallel rank (reduce-scatter, all-gather)."""

from .allreduce import allreduce_gradients
from .sharded import FlatShards

__all__ = ["FlatShards", "allreduce_gradients"]
