"""Data parallelism: allreduce.py sums each stage's gradients over its data-parallel group."""

from .allreduce import allreduce_gradients

__all__ = ["allreduce_gradients"]
