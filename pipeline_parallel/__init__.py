"""Split layers into stages and run them with torch.distributed.pipelining.

One pipeline = `pp` ranks; with `interleaved-1f1b` each rank holds `virtual` stages placed round-robin
(rank r holds stages r, r+pp, r+2pp, ...), as ScheduleInterleaved1F1B expects. With pp=1 the micro-batches run in a
plain loop: no schedule, no send/recv.

Schedules are built with scale_grads=False: the loss function already divides by the global loss-token count of the
optimizer step, so gradients come out identical whatever the layout.
"""

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B


class LayoutError(ValueError):
    """The layer split asked for does not fit the model."""


def split_layers(total_layers, num_stages, layers_per_stage=None, head_cost=0.0):
    """[(start, end)] per stage. Extra layers go to the earliest stages: the last one also carries the LM head.

    `layers_per_stage` is OpenChatKit's --num-layers: accepted when it equals the largest stage of the balanced split
    (e.g. 44 layers on 8 stages: --num-layers 6 gives 6,6,6,6,5,5,5,5), and then that split is used as is.
    Without it, `head_cost` (the LM head's compute in layers, modules.head_cost_in_layers) moves layers off the last
    stage while that lowers the busiest stage's work: every stage waits for the slowest one. Pythia-1.4B (head ~1.8
    layers) on 2 stages splits 13/11, not 12/12; GPT-NeoX-20B (0.7) on 8 stages keeps 6,6,6,6,5,5,5,5.
    """
    if num_stages > total_layers:
        raise LayoutError(
            f"{num_stages} pipeline stages for a model of {total_layers} layers; "
            f"lower --pipeline-group-size (or --virtual-stages)"
        )
    base, extra = divmod(total_layers, num_stages)
    sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    if layers_per_stage is not None and layers_per_stage != max(sizes):
        raise LayoutError(
            f"--num-layers {layers_per_stage} (layers per stage) does not fit {total_layers} layers "
            f"over {num_stages} stages; use --num-layers {max(sizes)} or omit it"
        )
    if layers_per_stage is None:
        sizes = _lighten_last_stage(sizes, head_cost)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _lighten_last_stage(sizes, head_cost):
    def busiest(candidate):
        return max(candidate[:-1] + [candidate[-1] + head_cost])

    while len(sizes) > 1 and sizes[-1] > 1:
        lightest = min(range(len(sizes) - 1), key=lambda i: (sizes[i], i))
        candidate = list(sizes)
        candidate[lightest] += 1
        candidate[-1] -= 1
        if busiest(candidate) >= busiest(sizes):
            break
        sizes = candidate
    return sizes


def stage_ids_of_rank(pp_rank, pp_size, virtual):
    return [pp_rank + v * pp_size for v in range(virtual)]


class Pipeline:
    """Runs one iteration (all micro-batches of one batch) forward and backward over this rank's stages."""

    def __init__(self, modules, stage_ids, num_stages, layout, n_microbatches, mode, loss_fn):
        self.modules = modules
        self.stage_ids = stage_ids
        self.num_stages = num_stages
        self.layout = layout
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.holds_first = 0 in stage_ids
        self.holds_last = num_stages - 1 in stage_ids
        self.schedule = None
        if num_stages > 1:
            stages = [
                PipelineStage(m, s, num_stages, layout.device, group=layout.pp_group)
                for m, s in zip(modules, stage_ids)
            ]
            if mode == "interleaved-1f1b":
                self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
            else:
                schedule_cls = Schedule1F1B if mode == "1f1b" else ScheduleGPipe
                self.schedule = schedule_cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)

    def _local(self, input_ids, labels, train):
        """pp=1: the same micro-batch split and loss, in a plain loop."""
        model = self.modules[0]
        losses = []
        for ids, lab in zip(input_ids.chunk(self.n_microbatches), labels.chunk(self.n_microbatches)):
            with torch.set_grad_enabled(train):
                loss = self.loss_fn(model(ids), lab)
            if train:
                loss.backward()
            losses.append(loss.detach())
        return losses

    def run(self, input_ids, labels, train=True):
        """One batch. Returns the summed micro-batch losses on the rank holding the last stage, else None."""
        if self.schedule is None:
            return torch.stack(self._local(input_ids, labels, train)).sum()
        args = (input_ids,) if self.holds_first else ()
        target = labels if self.holds_last else None
        losses = [] if self.holds_last else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            with torch.no_grad():
                self.schedule.eval(*args, target=target, losses=losses)
        if not self.holds_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()
