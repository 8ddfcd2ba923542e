"""PackedStream: the training data iterator (weighted multi-task, shuffled, packed, resumable, prefetched).

Pipeline (in a background thread when num_workers >= 1):
  Mixture (weighted task choice + per-task shuffle buffer readers)  → chunks of raw lines
  → thread pool of `num_workers` tokenisers (render + batched Rust encode, GIL released)  → in-order Chunks
  → Packer (EOS packing, windows, global batches, this replica's rows)  → queue of `prefetch` batches.
Every batch carries the position after it (a StateRef); the consumer remembers the one of the last batch it handed
out, so state_dict() describes exactly what training consumed, never what was prefetched.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .loader import LoaderStream, check_same_sources, copy_json
from .packing import ChunkMeta, Packer
from .reader import Mixture, file_signature, record_size
from .render import RecordFormat, Renderer, check_columns
from .spec import TaskError, parse_task_spec
from .tokenize import Encoder

if TYPE_CHECKING:
    from config import DataConfig

STATE_FORMAT = "tasks.PackedStream/1"


def check_positive(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise TaskError(f"{name} must be an integer >= {minimum}, got {value!r}")


def show_data_from_env() -> bool:
    """SHOW_DATA set (to anything but 0 / false / no): the streams print samples of what they serve."""
    return os.environ.get("SHOW_DATA", "").strip().lower() not in ("", "0", "false", "no")


def task_signatures(tasks) -> list[dict]:
    """Each task's name, weight and files (name and size): what a stream's state or a token cache was read from."""
    return [{"name": t.name, "weight": t.raw_weight, "files": [file_signature(f) for f in t.files]} for t in tasks]


def show_every_from_env() -> int:
    raw = os.environ.get("SHOW_DATA_EVERY", "").strip()
    if not raw:
        return 100
    try:
        every = int(raw)
    except ValueError:
        every = 0
    if every < 1:
        raise TaskError(
            f"SHOW_DATA_EVERY={raw!r} is not a whole number >= 1; set it to how many batches apart "
            f"SHOW_DATA prints a sample (e.g. SHOW_DATA_EVERY=100), or unset it"
        )
    return every


# The flags behind the data settings a state records, for the messages that name a change.
_FLAGS = {
    "data_format": "--data-format",
    "text_field": "--text-field",
    "messages_field": "--messages-field",
    "train_on_inputs": "--train-on-inputs",
    "loss_on_bot_only": "--loss-on-bot-only",
}


def _changes(saved: dict | None, mine: dict) -> str:
    """ "--flag old → new, ..." for the settings that differ; "" when none do or the state predates them (None)."""
    if saved is None:
        return ""
    return ", ".join(f"{_FLAGS[k]} {saved.get(k)!r} → {v!r}" for k, v in mine.items() if saved.get(k) != v)


def format_sample(batch, tokenizer, row: int = 0) -> str:
    """Decode one row; spans that take loss (as labels) are wrapped in [[ ]]."""
    ids = batch["input_ids"][row].tolist()
    labels = batch["labels"][row].tolist()
    toks = list(ids)
    flags = [False] + [lab != -100 for lab in labels]  # flag of token t as a prediction target
    if labels[-1] != -100:
        toks.append(labels[-1])
    else:
        flags = flags[:-1]
    parts, start = [], 0
    for t in range(1, len(toks) + 1):
        if t == len(toks) or flags[t] != flags[start]:
            text = tokenizer.decode(toks[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts.append(f"[[{text}]]" if flags[start] else text)
            start = t
    return "".join(parts)


class PackedStream(LoaderStream):
    """Infinite iterator of batches: dicts of int64 tensors [batch_size, seq_length] with input_ids, labels
    (already shifted, -100 = no loss), position_ids (restart per document) and doc_ids."""

    def __init__(
        self,
        data: DataConfig,
        tokenizer,
        dp_rank: int = 0,
        dp_size: int = 1,
        show_data: bool | None = None,
        *,
        prefetch: int = 4,
        chunk_docs: int = 256,
        chunk_bytes: int = 1 << 20,
        show_every: int | None = None,
    ):
        """The stream of `data` (--task-name and the data settings) as replica `dp_rank` of `dp_size` reads it.
        `show_data` None: print samples when SHOW_DATA is set (every SHOW_DATA_EVERY batches, or `show_every`)."""
        task_spec, seq_length, batch_size = data.task_spec, data.seq_length, data.batch_size
        seed, shuffle_buffer, num_workers = data.seed, data.shuffle_buffer, data.workers
        train_on_inputs, loss_on_bot_only = data.train_on_inputs, data.loss_on_bot_only
        check_positive("seq_length", seq_length)
        check_positive("batch_size", batch_size)
        check_positive("dp_size", dp_size)
        check_positive("shuffle_buffer", shuffle_buffer)
        check_positive("num_workers", num_workers, 0)
        check_positive("prefetch", prefetch)
        check_positive("chunk_docs", chunk_docs)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise TaskError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        self.tasks = parse_task_spec(task_spec)
        self.tokenizer = tokenizer
        self.seq_length, self.batch_size = seq_length, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = int(seed)
        self.train_on_inputs, self.loss_on_bot_only = train_on_inputs, loss_on_bot_only
        self.shuffle_buffer = shuffle_buffer
        self.num_workers, self.prefetch = num_workers, prefetch
        self.chunk_docs, self.chunk_bytes = chunk_docs, chunk_bytes
        self.record_format = RecordFormat.of(data)
        check_columns(self.tasks, self.record_format)
        self.renderer = Renderer(tokenizer, train_on_inputs, loss_on_bot_only, self.record_format)
        self.encoder = Encoder(tokenizer)
        self._codec = Mixture(self.tasks, self.seed, shuffle_buffer)  # serialises snapshots; never reads
        self._pipe = _Pipeline(self)
        if show_data is None:
            show_data = show_data_from_env()
        self.show_data = show_data and dp_rank == 0
        if show_every is None:
            show_every = show_every_from_env()
        check_positive("show_every", show_every)
        self.show_every = show_every
        self._resume: dict | None = None  # JSON state to start from
        self._init_loader()  # self._consumed: the StateRef (or JSON state) after the last batch handed out

    def _show(self, batch) -> str:
        return (
            f"[tasks] SHOW_DATA batch {self._served} row 0 (loss on [[...]] spans, "
            f"{int((batch['labels'][0] != -100).sum())}/{self.seq_length} labels):\n"
            f"{format_sample(batch, self.tokenizer)}\n[tasks] end of sample"
        )

    # ------------------------------------------------------------------ state
    @property
    def epochs(self) -> dict[str, int]:
        """Completed passes over each task's files, as of the last batch handed out."""
        ref = self._consumed
        if ref is None:
            return dict(self._resume["epochs"]) if self._resume else {t.name: 0 for t in self.tasks}
        if isinstance(ref, dict):
            return dict(ref["epochs"])
        eps = self._codec.epochs_of(ref.meta.snapshot)
        for t, e in ref.meta.doc_epochs[: ref.skip_docs + 1]:
            eps[t] = max(eps[t], e)
        return {t.name: e for t, e in zip(self.tasks, eps)}

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "tokenizer": self.encoder.fingerprint,
            "record_format": {
                "data_format": self.record_format.format,
                "text_field": self.record_format.text_field,
                "messages_field": self.record_format.messages_field,
            },
            "loss_masking": {"train_on_inputs": self.train_on_inputs, "loss_on_bot_only": self.loss_on_bot_only},
            "tasks": task_signatures(self.tasks),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch handed out (identical on every dp replica)."""
        ref = self._consumed
        if isinstance(ref, dict):
            return copy_json(ref)
        if ref is None:
            if self._resume is not None:
                return copy_json(self._resume)
            source = Mixture(self.tasks, self.seed, self.shuffle_buffer)
            position = {"source": source.snapshot_to_json(source.snapshot()), "skip_docs": 0, "skip_tokens": 0}
            windows = 0
        else:
            position = {
                "source": self._codec.snapshot_to_json(ref.meta.snapshot),
                "skip_docs": ref.skip_docs,
                "skip_tokens": ref.skip_tokens,
            }
            windows = ref.windows
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "seq_length": self.seq_length,
            "global_batch": self.batch_size * self.dp_size,
            "windows": windows,
            "tokens": windows * self.seq_length,
            "epochs": self.epochs,
            "position": position,
        }

    def load_state_dict(self, state: dict, strict: bool = True):
        """Continue after the batch `state` was taken at. strict=False tolerates data files that changed size (the
        trainer's --resume-data continue; its --resume-data restart does not call this)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TaskError(
                f"not a data-stream state (expected format {STATE_FORMAT!r}); was it written by "
                f"tasks.PackedStream.state_dict()?"
            )
        mine = self._identity()
        changed = _changes(state.get("record_format"), mine["record_format"])
        if changed:
            raise TaskError(
                f"cannot resume the data stream: how records are read changed since the checkpoint ({changed}); "
                f"restore the flags, or pass --resume-data restart to read the data from the start"
            )
        changed = _changes(state.get("loss_masking"), mine["loss_masking"])
        if strict and changed:
            raise TaskError(
                f"cannot resume the data stream exactly: which tokens take loss changed since the checkpoint "
                f"({changed}); restore the flags, or pass --resume-data continue to go on with the new setting"
            )
        check_same_sources(state, mine, strict, shuffle_flag="the shuffle buffer size")
        self._restart_at(state)


class _Pipeline:
    """What the loader thread runs: Mixture → tokeniser pool → Packer, yielding (batch, StateRef)."""

    def __init__(self, stream: PackedStream):
        for name in (
            "tasks",
            "renderer",
            "encoder",
            "seq_length",
            "batch_size",
            "dp_rank",
            "dp_size",
            "seed",
            "shuffle_buffer",
            "num_workers",
            "chunk_docs",
            "chunk_bytes",
        ):
            setattr(self, name, getattr(stream, name))

    def chunks(self, mix: Mixture, drop: int):
        while True:
            snap = mix.snapshot()
            docs, eps, nbytes = [], [], 0
            while len(docs) < self.chunk_docs and nbytes < self.chunk_bytes:
                t, item = mix.next_doc()
                docs.append((t, item))
                eps.append((t, mix.readers[t].epoch))
                nbytes += record_size(item[0])
            yield ChunkMeta(snap, drop, eps), docs
            drop = 0

    @staticmethod
    def records(files, docs) -> list[tuple]:
        """What rendering each document of a chunk takes: (its raw record, its file, its line)."""
        return [(item[0], files[t][item[1]], item[3]) for t, item in docs]

    def encode(self, files, docs, drop):
        render = self.renderer.render_line
        return self.encoder.encode_chunk([render(*record) for record in self.records(files, docs)], drop)

    def encoded(self, mix: Mixture, drop: int, stop: threading.Event | None):
        """(ChunkMeta, Chunk) of the stream from `mix`'s position on, in order; encoded by a pool of `num_workers`
        threads when `stop` is given (the loader thread, or a cache build), else here."""
        files = [t.files for t in self.tasks]
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="tasks-tokenize") if stop else None
        pending: deque = deque()
        try:
            for meta, docs in self.chunks(mix, drop):
                if pool is None:
                    yield meta, self.encode(files, docs, meta.drop)
                    continue
                pending.append((meta, pool.submit(self.encode, files, docs, meta.drop)))
                if len(pending) > self.num_workers:
                    m, fut = pending.popleft()
                    yield m, fut.result()
                if stop.is_set():
                    return
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def batches(self, resume: dict | None, stop: threading.Event | None):
        mix = Mixture(self.tasks, self.seed, self.shuffle_buffer)
        windows, skip_docs, drop = 0, 0, 0
        if resume is not None:
            pos = resume["position"]
            mix.load_json(pos["source"])
            skip_docs, drop, windows = int(pos["skip_docs"]), int(pos["skip_tokens"]), int(resume["windows"])
        packer = Packer(self.seq_length, self.batch_size, self.dp_rank, self.dp_size, windows, self.encoder.eos)
        chunks = self.encoded(mix, drop, stop)
        try:
            for _ in range(skip_docs):
                mix.next_doc()
            for meta, chunk in chunks:
                yield from packer.feed(meta, chunk)
        finally:
            chunks.close()  # its tokeniser pool stops now, not when the generator is collected
            mix.close()
