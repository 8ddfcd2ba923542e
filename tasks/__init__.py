"""Task data for training: --task-name parsing, jsonl streaming, chat rendering, loss masks, packing, loader state.

from tasks import TaskError, parse_task_spec, PackedStream, evaluation_batches, count_tokens
from tasks import PreferenceStream, preference_evaluation_batches, count_pairs  # DPO / SimPO / ORPO pairs
from tasks import CachedStream, TokenCache, is_cache  # a token cache of tools/prepare_data.py
"""

from .cache import CachedStream, TokenCache, build_cache, is_cache
from .count import count_tokens
from .evaluation import evaluation_batches
from .preference import PreferenceStream, count_pairs, preference_evaluation_batches
from .render import Renderer
from .spec import TaskError, TaskSpec, parse_task_spec
from .stream import PackedStream, format_sample


def training_stream(data, tokenizer, dp_rank: int = 0, dp_size: int = 1, show_data=None, preference: bool = False):
    """The training stream of `data`: preference pairs, a token cache's windows, or the packed sources."""
    kind = PreferenceStream if preference else CachedStream if is_cache(data.task_spec) else PackedStream
    return kind(data, tokenizer, dp_rank, dp_size, show_data)


__all__ = [
    "CachedStream",
    "TokenCache",
    "build_cache",
    "is_cache",
    "training_stream",
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
