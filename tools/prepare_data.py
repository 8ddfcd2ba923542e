"""Tokenize a task spec's training stream once, into a token cache that runs read with --task-name CACHE_DIR.

    python tools/prepare_data.py --task-name "chat.jsonl:0.7,docs.parquet:0.3" --tokenizer-name MODEL_DIR \
        --output data/cache --tokens 200000000 [--seed 42] [--shuffle-buffer N] [--data-format ...]

The sources, their weights and the data flags are the training run's (same names, same defaults): the cache holds
exactly the token stream that run would read, so training on it is bit-identical, at any --seq-length, batch size or
layout. --tokens is how much of the stream to keep: at least the run's steps x --batch-size x --data-group-size x
--gradient-accumulate-step x --seq-length (a run that needs more stops at start-up and says so).

Documents are rendered and tokenized by --data-workers worker processes (default: one per usable core), each with a
one-thread tokenizer, while this process reads the sources in the run's order and writes the arrays; any worker
count writes the same bytes (0: this process does it all). Memory, independent of the data's size: this process
(~0.45 GB with torch and transformers loaded, plus the shuffle buffers), the forkserver the workers are forked from
(~0.25 GB, shared with them) and at most ~125 MB per worker of its own (its pages, and 2 chunks in flight of at most
256 documents or ~1 MiB of records each): about 0.7 GB + 0.125 GB x --data-workers, e.g. 2.7 GB for 16 workers
(tasks/build_workers.py). Measured with the bundled GPT-2 tokenizer on bench_data.py's mixed records, 2 cores: 2
workers 0.84M tokens/s with their ~3 s start-up, 1.26M after it (1 worker: 0.52M; in the same run the threads of
earlier versions: 0.77-0.82M); the 16-core GPU host: 16 workers 2.87M over a 30M-token build, 7.26M after their
6.3 s start-up (bench/RESULTS.md).

An interrupted build (Ctrl-C, a killed worker, a bad record) publishes nothing and continues where its progress was
last saved (every 10 s) on the next call with the same flags; a finished one is published by replacing
CACHE_DIR/cache.json, so runs reading an older build go on reading it. See tasks/cache.py for the layout.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from config import DataConfig, ModelRunConfig, add_section_flags  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.logging import error_line  # noqa: E402

DATA_SETTINGS = [
    "task_spec",
    "shuffle_buffer",
    "data_format",
    "text_field",
    "messages_field",
    "train_on_inputs",
    "loss_on_bot_only",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_section_flags(parser, DataConfig, DATA_SETTINGS)
    add_section_flags(parser, ModelRunConfig, ["tokenizer_dir", "seed"])
    parser.add_argument("--output", required=True, help="the cache folder (created; a rebuild publishes a new build)")
    parser.add_argument("--tokens", type=int, required=True, help="tokens of the stream to keep (at least)")
    parser.add_argument(
        "--data-workers",
        type=int,
        default=None,
        dest="workers",
        help="worker processes that render and tokenize, one core each (default: one per usable core; 0: this "
        "process does it)",
    )
    return parser


class Terminated(Exception):
    """SIGTERM (kill, a scheduler's cancel): the build stops as on Ctrl-C, its workers with it."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.task_spec or not args.tokenizer_dir:
        error_line("prepare_data: --task-name and --tokenizer-name are required")
        return 2
    if args.workers is not None and args.workers < 0:
        error_line(f"prepare_data: --data-workers is a count of processes, >= 0; got {args.workers}")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from transformers import AutoTokenizer

        from tasks.cache import build_cache

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - a broken folder surfaces as JSON, value or OS errors
            raise UserError(
                f"--tokenizer-name {args.tokenizer_dir}: cannot load the tokenizer ({type(e).__name__})"
            ) from None
        data = DataConfig(**{name: getattr(args, name) for name in DATA_SETTINGS}, seed=args.seed)
        build_cache(data, tokenizer, args.output, args.tokens, workers=args.workers)
    except UserError as e:
        error_line(str(e))
        return 2
    except (KeyboardInterrupt, Terminated) as stop:  # the workers are stopped, nothing was published
        how, code = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("stopped by SIGTERM", 143)
        error_line(f"prepare_data: {how}; run it again with the same flags to continue from its saved progress")
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
