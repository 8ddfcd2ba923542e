"""The stage plan: how many stages, which layers each holds, which stages this rank runs.

One pipeline = `pp` ranks; with `interleaved-1f1b` each rank holds `virtual` stages placed round-robin (rank r holds
stages r, r+pp, r+2pp, ...), as ScheduleInterleaved1F1B expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError


class LayoutError(UserError, ValueError):
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


@dataclass(frozen=True)
class StagePlan:
    """This rank's part of the pipeline."""

    num_stages: int  # all stages of one pipeline
    bounds: list[tuple[int, int]]  # [start, end) layers of every stage
    stage_ids: list[int]  # the stages this rank runs, in schedule order

    @property
    def holds_first(self) -> bool:
        """This rank embeds the input ids."""
        return 0 in self.stage_ids

    @property
    def holds_last(self) -> bool:
        """This rank computes the loss."""
        return self.num_stages - 1 in self.stage_ids

    @property
    def reads_data(self) -> bool:
        return self.holds_first or self.holds_last


def plan_stages(
    num_layers: int,
    pp_size: int,
    pp_rank: int,
    mode: str,
    virtual_stages: int,
    layers_per_stage: int | None,
    head_cost: float,
) -> StagePlan:
    """The split of `num_layers` over `pp_size` ranks (`virtual_stages` each under interleaved-1f1b)."""
    virtual = virtual_stages if mode == "interleaved-1f1b" else 1
    num_stages = pp_size * virtual
    if virtual > 1 and layers_per_stage is not None:  # it counts a rank's layers: the same rule as one stage each
        split_layers(num_layers, pp_size, layers_per_stage)
    bounds = split_layers(num_layers, num_stages, layers_per_stage if virtual == 1 else None, head_cost=head_cost)
    return StagePlan(num_stages, bounds, stage_ids_of_rank(pp_rank, pp_size, virtual))
