"""Validation loss over --evaluation-data: every rank runs the same batches (every stage takes part in each), the
loss counts the tokens training learns (the same masking settings), summed over the data-parallel replicas."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

import tasks
from comm import Layout
from config import DataConfig


def evaluate(
    data: DataConfig,
    tokenizer,
    layout: Layout,
    run_batch: Callable[[dict], torch.Tensor | None],
) -> dict[str, float] | None:
    """{"valid.loss", "valid.perplexity"} on the logging rank (None elsewhere, or without a token to score).
    `run_batch(batch)` runs one batch forward through the pipeline and returns the last stage's loss sum."""
    total = torch.zeros(2, device=layout.device, dtype=torch.float64)  # loss sum, token count
    paths = [p for p in data.evaluation_data.split(",") if p]
    for i, batch in enumerate(tasks.evaluation_batches(paths, tokenizer, data, layout.dp_rank, layout.dp_size)):
        if data.evaluation_batches is not None and i >= data.evaluation_batches:
            break
        loss = run_batch(batch)
        if loss is not None:
            total[0] += loss.double()
            total[1] += (batch["labels"] != -100).sum()
    if layout.cp_size > 1:  # each cp rank scored its own tokens of the same batches
        loss = total[:1].clone()
        dist.all_reduce(loss, group=layout.cp_group)
        total[0] = loss[0]
    if layout.dp_size > 1:
        dist.all_reduce(total, group=layout.dp_group)
    if not layout.is_logger or total[1] == 0:
        return None
    mean = (total[0] / total[1]).item()
    return {"valid.loss": mean, "valid.perplexity": math.exp(min(mean, 50))}


def pair_batches(data: DataConfig, tokenizer, layout: Layout):
    """The held-out preference pairs of --evaluation-data, this replica's share, at most --evaluation-num-batch
    batches."""
    paths = [p for p in data.evaluation_data.split(",") if p]
    batches = tasks.preference_evaluation_batches(paths, tokenizer, data, layout.dp_rank, layout.dp_size)
    return itertools.islice(batches, data.evaluation_batches)
