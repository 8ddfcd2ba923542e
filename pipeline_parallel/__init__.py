"""Pipeline parallelism: split.py plans the stages (layers per stage, stages per rank); schedule.py runs them."""

from .schedule import Pipeline
from .split import LayoutError, StagePlan, plan_stages, split_layers, stage_ids_of_rank

__all__ = ["LayoutError", "Pipeline", "StagePlan", "plan_stages", "split_layers", "stage_ids_of_rank"]
