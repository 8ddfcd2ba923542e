"""Run this rank's stages with torch.distributed.pipelining (the plan comes from split.py).

With pp=1 the micro-batches run in a plain loop: no schedule, no send/recv, and torch.distributed.pipelining is not
even imported (it pulls in FSDP, DTensor, sympy and dynamo: seconds of every start-up).

Schedules are built with scale_grads=False: the loss function already divides by the global loss-token count of the
optimizer step, so gradients come out identical whatever the layout.
"""

import torch

from config import PipelineConfig
from pipeline_parallel.split import StagePlan


class Pipeline:
    """Runs one iteration (all micro-batches of one batch) forward and backward over this rank's stages."""

    def __init__(self, modules, plan: StagePlan, layout, cfg: PipelineConfig, loss_fn):
        self.modules = modules
        self.n_microbatches = cfg.micro_batches
        self.loss_fn = loss_fn
        self.holds_first = plan.holds_first
        self.holds_last = plan.holds_last
        self.schedule = None
        if plan.num_stages > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

            stages = [
                PipelineStage(m, s, plan.num_stages, layout.device, group=layout.pp_group)
                for m, s in zip(modules, plan.stage_ids)
            ]
            if cfg.mode == "interleaved-1f1b":
                self.schedule = ScheduleInterleaved1F1B(stages, cfg.micro_batches, loss_fn=loss_fn, scale_grads=False)
            else:
                schedule_cls = Schedule1F1B if cfg.mode == "1f1b" else ScheduleGPipe
                self.schedule = schedule_cls(stages[0], cfg.micro_batches, loss_fn=loss_fn, scale_grads=False)

    def _local(self, input_ids, labels, train, stage_kwargs, widths):
        """pp=1: the same micro-batch split and loss, in a plain loop."""
        model = self.modules[0]
        n = self.n_microbatches
        chunked = {k: v.chunk(n) for k, v in stage_kwargs.items()}
        losses = []
        for i, (ids, lab) in enumerate(zip(input_ids.chunk(n), labels.chunk(n))):
            width = widths[i] if widths else None  # None: every column (under cp the ids stay whole, the tokens not)
            with torch.set_grad_enabled(train):
                kwargs = {k: v[i] if k == "doc_lengths" else v[i][:, :width] for k, v in chunked.items()}
                outputs = model(ids[:, :width], **kwargs)
                loss = self.loss_fn(outputs, lab)
            if train:
                loss.backward()
            losses.append(loss.detach())
        return losses

    def run(self, input_ids, labels, train=True, widths=None, **stage_kwargs):
        """One batch. Returns the summed micro-batch losses on the rank holding the last stage, else None.
        `stage_kwargs` ([B, S] tensors: position_ids, doc_ids; [B, K]: doc_lengths) reach every stage, split like
        the batch: every rank of the pipeline passes them. `widths` (pp=1 only: a schedule's stages have fixed
        shapes): micro-batch i runs on its first widths[i] columns of the batch and of every [B, S] stage kwarg
        (doc_lengths must already count the cut rows), its loss function still gets the whole target (columns past
        the outputs must take no loss)."""
        if widths is not None and self.schedule is not None:
            raise ValueError("micro-batch widths need pp=1: pipeline stages exchange fixed shapes")
        if self.schedule is None:
            return torch.stack(self._local(input_ids, labels, train, stage_kwargs, widths)).sum()
        args = (input_ids,) if self.holds_first else ()
        target = labels if self.holds_last else None
        losses = [] if self.holds_last else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **stage_kwargs)
        else:
            with torch.no_grad():
                self.schedule.eval(*args, target=target, losses=losses, **stage_kwargs)
        if not self.holds_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()
