"""The token cache: a task spec's training stream tokenized once (tools/prepare_data.py), then read by every run and
every data-parallel replica without tokenizing again (--task-name CACHE_DIR).

What it holds is the stream PackedStream would produce from the same sources and settings: the documents in the
order the weighted mixture and its shuffle buffers draw them, rendered and tokenized, EOS-terminated, concatenated.
Windows are cut from it exactly as the packer cuts them (window i is tokens [i·S, i·S + S + 1)), so a run on the cache
trains bit-identically to one on the sources, at any --seq-length, batch or layout; a replica reads only the tokens
of its own windows, and a resume goes straight to its window.

    CACHE_DIR/cache.json              the published build: its folder, its identity, its sizes (replaced atomically)
    CACHE_DIR/build-<id>-<time>/      tokens.bin (uint32), trained.bin (bool: the token takes loss as a label),
                                      doc_start.bin (bool), epochs.json (where each task's passes begin),
                                      progress.json while the build runs (it resumes from there)

The order depends on --seed and --shuffle-buffer, the tokens on the tokenizer and the rendering flags: they are the
cache's identity, and a run whose settings differ is refused in one line. A finished build is never written again:
a rebuild goes to a new folder and then replaces cache.json, so a run reading an older build keeps reading it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.host import usable_cores

from .build_workers import encoded_in_processes
from .loader import LoaderStream, copy_json
from .packing import KEYS, window_arrays
from .reader import Mixture
from .spec import TaskError, parse_task_spec
from .stream import (
    PackedStream,
    check_positive,
    format_sample,
    show_data_from_env,
    show_every_from_env,
    task_signatures,
)

if TYPE_CHECKING:
    from config import DataConfig

CACHE_FORMAT = "tasks.TokenCache/1"
STATE_FORMAT = "tasks.CachedStream/1"
INDEX = "cache.json"
PROGRESS = "progress.json"
ARRAYS = {"tokens": np.uint32, "trained": np.bool_, "doc_start": np.bool_}
BUILD_KINDS = ("processes", "threads")
SAVE_EVERY_S = 10.0  # a build's progress is recorded this often (and at its end)

# The settings that make the stream what it is, and the flag that sets each.
_SETTINGS = {
    "seed": "--seed",
    "shuffle_buffer": "--shuffle-buffer",
    "data_format": "--data-format",
    "text_field": "--text-field",
    "messages_field": "--messages-field",
    "train_on_inputs": "--train-on-inputs",
    "loss_on_bot_only": "--loss-on-bot-only",
}


def is_cache(task_spec: str) -> bool:
    return os.path.isfile(os.path.join(task_spec, INDEX))


def stream_identity(data: DataConfig, tokenizer) -> dict:
    """The settings and tokenizer a stream's tokens depend on (without its sources)."""
    from .tokenize import Encoder

    out = {name: getattr(data, name) for name in _SETTINGS}
    out["tokenizer"] = Encoder(tokenizer).fingerprint
    return out


# ----------------------------------------------------------------------------------------------------- building
def build_cache(
    data: DataConfig,
    tokenizer,
    output: str,
    tokens: int,
    log=print,
    *,
    workers: int | None = None,
    kind: str = "processes",
) -> dict:
    """Tokenize the stream of `data` (its --task-name and settings) until it holds at least `tokens` tokens, into a
    new build under `output`, then publish it; an unfinished build of the same sources and settings is continued.
    `workers` render and tokenize (None: one per usable core; 0: this thread does it): processes, each on one core
    (tasks/build_workers.py), or with kind "threads" the training loader's threads, each encoding on every core (to
    compare). Every choice writes the same bytes. Returns the published index."""
    check_positive("tokens", tokens)
    if workers is None:
        workers = usable_cores()
    check_positive("workers", workers, 0)
    if kind not in BUILD_KINDS:
        raise TaskError(f"build workers are {' or '.join(BUILD_KINDS)}, not {kind!r}")
    stream = PackedStream(data, tokenizer)  # its pipeline renders and tokenizes; the stream itself is not iterated
    pipe = stream._pipe
    identity = stream_identity(data, tokenizer)
    sources = task_signatures(parse_task_spec(data.task_spec))
    os.makedirs(output, exist_ok=True)
    strangers = [n for n in os.listdir(output) if n != INDEX and not n.startswith(("build-", INDEX + ".tmp"))]
    if strangers:  # a data folder given as --output would turn into a cache that hides its files
        raise TaskError(
            f"--output {output} holds other files ({', '.join(sorted(strangers)[:3])}); give an empty folder or an "
            f"earlier cache of tools/prepare_data.py"
        )
    folder = _unfinished_build(output, identity, sources) or os.path.join(
        output, f"build-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    os.makedirs(folder, exist_ok=True)
    mix = Mixture(stream.tasks, stream.seed, stream.shuffle_buffer)
    done = {"tokens": 0, "docs": 0, "epoch_starts": {t.name: [0] for t in stream.tasks}}
    progress_path = os.path.join(folder, PROGRESS)
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            saved = json.load(f)
        done = saved["done"]
        mix.load_json(saved["source"])
        log(f"prepare_data: continuing {folder} at {done['tokens']:,} tokens")
    files = {name: _open_truncated(folder, name, dtype, done["tokens"]) for name, dtype in ARRAYS.items()}
    last_epoch = {t.name: len(done["epoch_starts"][t.name]) - 1 for t in stream.tasks}
    names = [t.name for t in stream.tasks]
    started, saved_at, start_tokens = time.perf_counter(), 0.0, done["tokens"]
    chunks = _encoded(pipe, mix, workers, kind)
    try:
        for meta, chunk in chunks:
            now = time.perf_counter()
            if now - saved_at > SAVE_EVERY_S:  # the position before this chunk: a restart goes on from here
                _save_progress(progress_path, files, done, mix.snapshot_to_json(meta.snapshot), identity, sources)
                rate = (done["tokens"] - start_tokens) / max(now - started, 1e-9)
                log(f"prepare_data: {done['tokens']:,} / {tokens:,} tokens ({rate:,.0f} tokens/s)")
                saved_at = now
            for (task, epoch), start in zip(meta.doc_epochs, chunk.starts):
                if epoch > last_epoch[names[task]]:  # this task's next pass begins with this document
                    done["epoch_starts"][names[task]].append(done["tokens"] + start)
                    last_epoch[names[task]] = epoch
            files["tokens"].write(chunk.tokens.astype(np.uint32).tobytes())
            files["trained"].write(chunk.trained.astype(np.bool_).tobytes())
            files["doc_start"].write(chunk.doc_start.astype(np.bool_).tobytes())
            done["tokens"] += len(chunk.tokens)
            done["docs"] += len(chunk.starts)
            if done["tokens"] >= tokens:
                for f in files.values():  # on disk before the index that publishes them
                    f.flush()
                    os.fsync(f.fileno())
                break
    finally:
        chunks.close()
        mix.close()
        stream.close()
        for f in files.values():
            f.close()
    if done["tokens"] < tokens:
        raise TaskError(f"prepare_data: the stream ended at {done['tokens']:,} tokens")  # the mixture never ends
    with open(os.path.join(folder, "epochs.json"), "w") as f:
        json.dump(done["epoch_starts"], f)
    index = {
        "format": CACHE_FORMAT,
        "build": os.path.basename(folder),
        "tokens": done["tokens"],
        "documents": done["docs"],
        "identity": identity,
        "sources": sources,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_json_atomic(os.path.join(output, INDEX), index)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    log(f"prepare_data: {output} holds {done['tokens']:,} tokens of {done['docs']:,} documents ({index['build']})")
    return index


def _encoded(pipe, mix: Mixture, workers: int, kind: str):
    """The build's (ChunkMeta, Chunk) stream from `mix`'s position on, in order, from its workers."""
    if workers == 0:
        return pipe.encoded(mix, 0, None)
    if kind == "threads":
        pipe.num_workers = workers
        return pipe.encoded(mix, 0, threading.Event())
    return encoded_in_processes(pipe, mix, workers)


def _open_truncated(folder: str, name: str, dtype, count: int):
    """The array file `name` opened for appending, cut back to `count` elements (what the last progress counted)."""
    path = os.path.join(folder, f"{name}.bin")
    with open(path, "ab") as f:
        f.truncate(count * np.dtype(dtype).itemsize)
    return open(path, "ab")


def _save_progress(path, files, done, source, identity, sources) -> None:
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
    _write_json_atomic(path, {"done": done, "source": source, "identity": identity, "sources": sources})


def _unfinished_build(output: str, identity: dict, sources: list) -> str | None:
    """The folder of an interrupted build of the same settings and sources, if any."""
    for name in sorted(os.listdir(output)):
        path = os.path.join(output, name, PROGRESS)
        if name.startswith("build-") and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("identity") == identity and saved.get("sources") == sources:
                return os.path.join(output, name)
    return None


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- reading
class TokenCache:
    """A published build, memory-mapped: read once at start, kept while a run reads it."""

    def __init__(self, folder: str):
        self.folder = folder
        try:
            with open(os.path.join(folder, INDEX)) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise TaskError(f"--task-name {folder}: unreadable token cache index ({e}); rebuild it") from None
        if self.index.get("format") != CACHE_FORMAT:
            raise TaskError(
                f"--task-name {folder}: a token cache of format {self.index.get('format')!r}, this version reads "
                f"{CACHE_FORMAT!r}; rebuild it with this version's tools/prepare_data.py"
            )
        build = os.path.join(folder, self.index["build"])
        self.tokens = self.index["tokens"]
        self.arrays = {}
        for name, dtype in ARRAYS.items():
            path = os.path.join(build, f"{name}.bin")
            want = self.tokens * np.dtype(dtype).itemsize
            size = os.path.getsize(path) if os.path.exists(path) else -1
            if size != want:
                raise TaskError(
                    f"--task-name {folder}: the token cache is damaged ({name}.bin holds {max(size, 0):,} bytes, its "
                    f"index says {want:,}); rebuild it with tools/prepare_data.py"
                )
            self.arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(self.tokens,))
        with open(os.path.join(build, "epochs.json")) as f:
            self.epoch_starts = json.load(f)

    def check_settings(self, data: DataConfig, tokenizer) -> None:
        """Refuse a run whose tokenizer or stream settings are not the ones the cache was built with."""
        built, mine = self.index["identity"], stream_identity(data, tokenizer)
        if built["tokenizer"] != mine["tokenizer"]:
            raise TaskError(
                f"--task-name {self.folder}: the token cache was built with another tokenizer than this run's "
                f"(--tokenizer-name); use that tokenizer, or rebuild the cache with this one (tools/prepare_data.py)"
            )
        for name, flag in _SETTINGS.items():
            if built[name] != mine[name]:
                raise TaskError(
                    f"--task-name {self.folder}: the token cache was built with {flag} {built[name]!r}, this run has "
                    f"{mine[name]!r}; pass {flag} {built[name]!r}, or rebuild the cache with tools/prepare_data.py"
                )

    def serves(self, data: DataConfig, tokenizer, tokens: int) -> bool:
        """Whether this cache is the stream of `data`'s sources and settings, at least `tokens` long."""
        sources = task_signatures(parse_task_spec(data.task_spec))
        same = self.index["identity"] == stream_identity(data, tokenizer) and self.index["sources"] == sources
        return same and self.tokens >= tokens

    def windows(self, seq_length: int) -> int:
        return (self.tokens - 1) // seq_length

    def check_holds(self, windows: int, seq_length: int) -> None:
        """Refuse, at start-up, a run that needs more windows of `seq_length` tokens than the cache holds."""
        if windows > self.windows(seq_length):
            need = windows * seq_length + 1
            raise TaskError(
                f"--task-name {self.folder}: the token cache holds {self.tokens:,} tokens and this run trains on "
                f"{need:,} ({windows:,} windows of --seq-length {seq_length}); rebuild it with --tokens {need} "
                f"(tools/prepare_data.py), or train fewer --total-steps"
            )


class CachedStream(LoaderStream):
    """PackedStream's batches read from a token cache: this replica's rows of each global batch, and nothing else."""

    def __init__(self, data: DataConfig, tokenizer, dp_rank: int = 0, dp_size: int = 1, show_data=None):
        self.cache = TokenCache(data.task_spec)
        self.cache.check_settings(data, tokenizer)
        self.tokenizer = tokenizer
        self.seq_length, self.batch_size, self.dp_rank, self.dp_size = (
            data.seq_length,
            data.batch_size,
            dp_rank,
            dp_size,
        )
        self.num_workers, self.prefetch = min(data.workers, 1), 4
        if show_data is None:  # SHOW_DATA prints samples as the sources' stream does
            show_data = show_data_from_env()
        self.show_data, self.show_every = show_data and dp_rank == 0, show_every_from_env()
        self._pipe = _CachePipeline(self)
        self._resume = None
        self._init_loader()

    @property
    def epochs(self) -> dict[str, int]:
        """Passes over each task begun before the next window, as of the last batch handed out."""
        position = self.position * self.seq_length
        return {
            name: int(np.searchsorted(starts, position, side="right")) - 1
            for name, starts in self.cache.epoch_starts.items()
        }

    @property
    def position(self) -> int:
        """Windows of the global stream handed out (every replica's)."""
        ref = self._consumed
        return int(ref["windows"]) if ref is not None else 0

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "cache": self.cache.index["build"],
            "identity": self.cache.index["identity"],
            "sources": self.cache.index["sources"],
            "seq_length": self.seq_length,
            "global_batch": self.batch_size * self.dp_size,
            "windows": self.position,
            "tokens": self.position * self.seq_length,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue after the batch `state` was taken at (`strict` concerns changed source files: a cache is fixed)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TaskError(
                "cannot resume the data stream: the checkpoint read its data from the sources, this run from a token "
                "cache; resume with the checkpoint's --task-name, or pass --resume-data restart"
            )
        # Builds of the same sources and settings hold the same stream (a longer one continues it), whichever
        # folder or machine they were built in: that is what must match.
        if state["identity"] != self.cache.index["identity"] or state["sources"] != self.cache.index["sources"]:
            raise TaskError(
                f"cannot resume the data stream: the token cache {self.cache.folder} was built from other sources or "
                f"settings than the checkpoint's (build {state['cache']}); use a cache of those, or pass "
                f"--resume-data restart"
            )
        if state["seq_length"] != self.seq_length:
            raise TaskError(
                f"cannot resume the data stream: --seq-length {self.seq_length}, the checkpoint's {state['seq_length']}; "
                f"restore it, or pass --resume-data restart"
            )
        self._restart_at(copy_json(state))

    def _show(self, batch) -> str:
        return f"[tasks] SHOW_DATA batch {self._served} row 0 (token cache):\n{format_sample(batch, self.tokenizer)}"


class _CachePipeline:
    """What the loader runs: batch after batch of this replica's windows, read from the memory-mapped arrays."""

    def __init__(self, stream: CachedStream):
        self.cache, self.S, self.B = stream.cache, stream.seq_length, stream.batch_size
        self.r, self.G = stream.dp_rank, stream.batch_size * stream.dp_size
        self.tokens_read = 0  # token positions this replica has read (the tests count them)

    def batches(self, resume: dict | None, stop):
        arrays = self.cache.arrays
        available = self.cache.windows(self.S)
        start = int(resume["windows"]) if resume is not None else 0
        while True:
            first = start + self.r * self.B
            mine = np.arange(first, first + self.B)
            if start + self.G > available:
                raise TaskError(
                    f"the token cache {self.cache.folder} holds {self.cache.tokens:,} tokens ({available:,} windows "
                    f"of {self.S}); this step needs {start + self.G:,} windows: rebuild it with more --tokens"
                )
            rows = window_arrays(arrays["tokens"], arrays["trained"], arrays["doc_start"], mine, self.S)
            self.tokens_read += len(mine) * (self.S + 1)
            batch = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for k, a in zip(KEYS, rows)}
            start += self.G
            yield batch, {"windows": start}
