"""Task data for training: --task-name parsing, jsonl streaming, chat rendering, loss masks, packing, loader state.

from tasks import TaskError, parse_task_spec, PackedStream, evaluation_batches, count_tokens
from tasks import PreferenceStream, preference_evaluation_batches, count_pairs  # DPO / SimPO / ORPO pairs
"""

from .count import count_tokens
from .evaluation import evaluation_batches
from .preference import PreferenceStream, count_pairs, preference_evaluation_batches
from .render import Renderer
from .spec import TaskError, TaskSpec, parse_task_spec
from .stream import PackedStream, format_sample

__all__ = [
    "TaskError",
    "TaskSpec",
    "parse_task_spec",
    "PackedStream",
    "evaluation_batches",
    "count_tokens",
    "Renderer",
    "format_sample",
    "PreferenceStream",
    "preference_evaluation_batches",
    "count_pairs",
]
