"""Attention over a split sequence: the keys and values gathered from the group, the mask of this rank's queries
against all keys by their true positions (causal, within documents, within a sliding window)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .split import ContextSplit


class _GatherSequence(torch.autograd.Function):
    """[B, H, s, D] of each rank -> [B, H, C x s, D], rank after rank; the backward sums every rank's gradient of
    the gathered tensor and hands each rank its own part."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        rank, local = dist.get_rank(ctx.group), grad.shape[2] // ctx.size
        if grad.is_cuda:  # NCCL: each rank receives the sum of its own part only
            out = torch.empty_like(grad[:, :, :local]).contiguous()
            dist.reduce_scatter(out, [p.contiguous() for p in grad.split(local, dim=2)], group=ctx.group)
            return out, None, None
        total = grad.contiguous().clone()  # gloo has no reduce-scatter: sum everything, keep this rank's part
        dist.all_reduce(total, group=ctx.group)
        return total[:, :, rank * local : (rank + 1) * local].contiguous(), None, None


def gather_sequence(x: torch.Tensor, context: ContextSplit) -> torch.Tensor:
    return _GatherSequence.apply(x, context.group, context.size)


class ContextMask:
    """What a block's attention takes under context parallelism: the mask of this rank's queries against the
    gathered keys (boolean [B|1, 1, s, S] for SDPA, or a FlexAttention mask on GPUs) and the group to gather from."""

    def __init__(self, mask, context: ContextSplit):
        self.mask, self.context = mask, context


def context_masks(cfg, context: ContextSplit, seq: int, doc_ids, device) -> dict[str, ContextMask]:
    """{layer type: ContextMask} for sequences of `seq` tokens (all ranks' together); `doc_ids` [B, seq] or None."""
    q_pos, kv_pos = context.local_index(seq, device), context.key_index(seq, device)
    window = cfg.sliding_window if "sliding" in cfg.layer_types and cfg.sliding_window < seq else None
    kinds = {"full": None, "sliding": window} if "sliding" in cfg.layer_types else {"full": None}
    if device.type == "cuda":
        return {kind: ContextMask(_flex_mask(q_pos, kv_pos, doc_ids, w), context) for kind, w in kinds.items()}
    visible = kv_pos[None, :] <= q_pos[:, None]
    if doc_ids is not None:
        same = doc_ids[:, q_pos][:, :, None] == doc_ids[:, kv_pos][:, None, :]
        visible = (visible[None] & same)[:, None]  # [B, 1, s, S]
    else:
        visible = visible[None, None]
    out = {}
    for kind, w in kinds.items():
        mask = visible if w is None else visible & ((q_pos[:, None] - kv_pos[None, :]) < w)
        out[kind] = ContextMask(mask, context)
    return out


def _flex_mask(q_pos, kv_pos, doc_ids, window):
    from torch.nn.attention.flex_attention import create_block_mask

    from modules.layers import FlexMask

    def visible(b, h, q_idx, kv_idx):
        q, kv = q_pos[q_idx], kv_pos[kv_idx]
        out = kv <= q
        if window is not None:
            out = out & (q - kv < window)
        if doc_ids is not None:
            out = out & (doc_ids[b, q] == doc_ids[b, kv])
        return out

    batch = doc_ids.shape[0] if doc_ids is not None else None
    flex = FlexMask()
    flex.block_mask = create_block_mask(
        visible, batch, None, len(q_pos), len(kv_pos), device=q_pos.device, _compile=True
    )
    return flex
