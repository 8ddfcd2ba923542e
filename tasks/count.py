"""count_tokens: packed tokens (document tokens + its EOS) of a task spec, for --nepochs.

Counted once per file and cached beside it in `.<file name>.token_count.json`, keyed by the tokenizer fingerprint
(plus the record format when it is not the default) and the file's size and mtime; when the data directory is not
writable the cache goes to $XDG_CACHE_HOME/openchatkit-tasks (~/.cache/...) or, failing that, the system temp dir.
An hf: source has no file of its own: its count is cached in those directories, keyed by its record count and bytes
from the dataset info (not cached when the info has neither).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING

from utils.progress import progress

from . import sources
from .render import RecordFormat, Renderer, check_columns
from .spec import parse_task_spec
from .tokenize import Encoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_FORMAT = 1
_MAX_ENTRIES = 8


def _fallback_dirs() -> list[str]:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [
        os.path.join(base, "openchatkit-tasks", "token_counts"),
        os.path.join(tempfile.gettempdir(), f"openchatkit-tasks-{os.getuid() if hasattr(os, 'getuid') else 0}"),
    ]


def cache_paths(path: str) -> list[str]:
    """Where the count of `path` may be cached, in order of preference."""
    if sources.is_hf(path):
        key = hashlib.sha1(path.encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in path)
        return [os.path.join(f, f"{key}-{name}.token_count.json") for f in _fallback_dirs()]
    d, name = os.path.split(os.path.abspath(path))
    key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return [os.path.join(d, f".{name}.token_count.json")] + [
        os.path.join(f, f"{key}-{name}.token_count.json") for f in _fallback_dirs()
    ]


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) that a cached count must match; hf: (records, bytes) from its info; None: do not cache."""
    if sources.is_hf(path):
        _, records, nbytes = sources.signature(path)
        return None if records is None and nbytes is None else (records or 0, nbytes or 0)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _read_cache(path: str, fingerprint: str, size: int, mtime_ns: int):
    for cp in cache_paths(path):
        try:
            with open(cp) as fh:
                entry = json.load(fh)["entries"][fingerprint]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
            return entry
    return None


def _write_cache(path: str, fingerprint: str, entry: dict) -> str | None:
    for cp in cache_paths(path):
        try:
            try:
                with open(cp) as fh:
                    data = json.load(fh)
                if data.get("format") != CACHE_FORMAT:
                    raise ValueError
            except (OSError, ValueError):
                data = {"format": CACHE_FORMAT, "file": os.path.basename(path), "entries": {}}
            data["entries"].pop(fingerprint, None)
            data["entries"][fingerprint] = entry
            while len(data["entries"]) > _MAX_ENTRIES:
                data["entries"].pop(next(iter(data["entries"])))
            os.makedirs(os.path.dirname(cp), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cp), prefix=".tmp-token-count-")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; others sharing the data should read the cache too
                os.replace(tmp, cp)
            except BaseException:
                os.unlink(tmp)
                raise
            return cp
        except OSError:
            continue
    return None


def count_file(
    path: str,
    encoder: Encoder,
    renderer: Renderer,
    batch_docs: int = 1024,
    desc: str | None = None,
    show_progress: bool = False,
) -> dict:
    """Tokenise one file: {"tokens": packed tokens incl. one EOS per record, "records": n}. `show_progress`: a bar
    counting its records, labelled `desc` (utils.progress: when stderr is a terminal, or SHOW_PROGRESS=1)."""
    tokens = records = 0
    docs = []
    label = desc or f"counting tokens of {os.path.basename(path)}"
    for p, line_no, line in progress(sources.iter_records([path]), label, None, "record", show_progress):
        docs.append(renderer.render_text_only(line, p, line_no))
        if len(docs) >= batch_docs:
            tokens += sum(encoder.lengths(docs))
            records += len(docs)
            docs = []
    if docs:
        tokens += sum(encoder.lengths(docs))
        records += len(docs)
    return {"tokens": tokens, "records": records}


def count_tokens(
    task_spec: str | list[str] | tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
    per_task: bool = False,
    use_cache: bool = True,
    data_format: str = "auto",
    text_field: str | None = None,
    messages_field: str | None = None,
    show_progress: bool = True,
) -> int | dict[str, int]:
    """Packed tokens of one pass over every task (each record's tokens + one EOS).

    Returns the total (int), or {task name: tokens} with per_task=True. One epoch of the mixture in optimizer steps
    is about total / (seq_length * batch_size * dp_size). data_format / text_field / messages_field: as
    PackedStream's (they change what is counted, so they are part of the cache key). `show_progress`: this process
    may draw a bar over the records of each file it counts (cached counts draw none); pass the rank's is_logger.
    """
    tasks = parse_task_spec(task_spec)
    fmt = RecordFormat(data_format, text_field, messages_field)
    check_columns(tasks, fmt)
    encoder = Encoder(tokenizer)
    renderer = Renderer(tokenizer, record_format=fmt)
    fp = encoder.fingerprint + (f"+{hashlib.sha1(fmt.key.encode()).hexdigest()[:8]}" if fmt.key else "")
    # Cached counts first, so the bars can say how many files are left to count.
    done: dict[str, int] = {}
    stamps: dict[str, tuple[int, int] | None] = {}
    for f in dict.fromkeys(f for t in tasks for f in t.files):
        stamps[f] = _stamp(f) if use_cache else None
        entry = _read_cache(f, fp, *stamps[f]) if stamps[f] else None
        if entry is not None:
            done[f] = int(entry["tokens"])
    missing = [f for f in stamps if f not in done]
    for k, f in enumerate(missing, 1):
        desc = f"counting tokens of {os.path.basename(f)} (file {k}/{len(missing)})"
        entry = count_file(f, encoder, renderer, desc=desc, show_progress=show_progress)
        if stamps[f]:
            entry.update(size=stamps[f][0], mtime_ns=stamps[f][1])
            _write_cache(f, fp, entry)
        done[f] = int(entry["tokens"])
    counts = {t.name: sum(done[f] for f in t.files) for t in tasks}
    return counts if per_task else sum(counts.values())
