"""Where records come from: jsonl lines, parquet / arrow rows, `save_to_disk` folders and `hf:` datasets.

Every data file of a task is read as a sequence of records with a position that survives a restart:
  * `.jsonl` / `.jsonl.gz`: byte offset and line number (`JsonlFile`);
  * `.parquet`: row index; a seek starts at the row group holding the row (footer metadata), so nothing before it
    is decoded; reading goes one record batch at a time (constant memory);
  * `.arrow` (Arrow IPC stream, as `datasets` writes it, or IPC file): row index; a seek in a stream file reads
    and drops the batches before the row (one pass over the prefix, like .gz);
  * `hf:ORG/NAME[@split][#config]`: one pseudo-file read through `datasets.load_dataset(..., streaming=True)`; its
    position is the record count plus the `IterableDataset.state_dict()` (restored with `load_state_dict`).
A `save_to_disk` folder is its arrow files in the order `state.json` lists them.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .spec import TaskError

ROW_SUFFIXES = (".parquet", ".arrow")
HF_PREFIX = "hf:"
MIN_DATASETS = (2, 18)  # IterableDataset.state_dict / load_state_dict
_BATCH_ROWS = 1024  # rows decoded at a time from parquet / arrow


def is_hf(path: str) -> bool:
    return path.startswith(HF_PREFIX)


def is_rows(path: str) -> bool:
    """Records are rows (dicts), not jsonl lines."""
    return is_hf(path) or path.endswith(ROW_SUFFIXES)


def where(path: str, line_no: int) -> str:
    """How an error names a record: file:line for jsonl, file[row i] (0-based, as ds[i]) for rows."""
    return f"{path}[row {line_no - 1}]" if is_rows(path) else f"{path}:{line_no}"


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise TaskError(f"{what} needs pyarrow, which is not installed; pip install pyarrow") from None
    return pyarrow


# ---------------------------------------------------------------------------------------------- jsonl
# zlib.error: corrupt deflate data; EOFError: a .gz cut short; OSError (BadGzipFile): not gzip, bad CRC, disk errors
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _unreadable(path: str, where: str, exc: BaseException) -> TaskError:
    if path.endswith(".gz"):
        fix = (
            "the file is truncated or is not valid gzip; re-download it, or re-compress the .jsonl with gzip "
            "(or drop the .gz suffix if it is plain text)"
        )
    else:
        fix = "check that the file is complete and readable"
    return TaskError(f"cannot read {where}: {exc} ({type(exc).__name__}); {fix}")


class JsonlFile:
    """A .jsonl / .jsonl.gz file read line by line (binary). A failed read raises a TaskError naming the file and line rather
    than the bare EOFError / BadGzipFile gzip gives, which names neither."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.line_no = 0  # lines read so far
        try:
            self._fh = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)
        except _READ_ERRORS as e:
            raise _unreadable(path, path, e) from e

    def seek(self, offset: int, line_no: int) -> None:
        """Go to byte `offset` (decompressed, for .gz), the start of line `line_no` + 1."""
        try:
            self._fh.seek(offset)  # decompresses everything before it for .gz
        except _READ_ERRORS as e:
            raise _unreadable(self.path, f"{self.path} (skipping to line {line_no + 1})", e) from e
        self.line_no = line_no

    def readline(self) -> bytes:
        try:
            line = self._fh.readline()
        except _READ_ERRORS as e:
            raise _unreadable(self.path, f"{self.path}:{self.line_no + 1}", e) from e
        if line:
            self.line_no += 1
        return line

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_jsonl(path: str) -> JsonlFile:
    """A line reader (readline, seek, iteration, close) for a .jsonl or .jsonl.gz file."""
    return JsonlFile(path)


# ---------------------------------------------------------------------------------------------- parquet / arrow
def _not_readable(path: str, kind: str, exc: BaseException) -> TaskError:
    msg = " ".join(str(exc).split())
    return TaskError(
        f"{path} is not a readable {kind} file ({type(exc).__name__}: {msg}); re-export it "
        f"(e.g. Dataset.to_parquet / save_to_disk) or remove it from --task-name"
    )


def _is_ipc_file(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"ARROW1"


def schema_of(path: str) -> list[str]:
    """Column names of a parquet / arrow file; a TaskError when the file is not one."""
    pa = _pyarrow(path)
    if path.endswith(".parquet"):
        try:
            return list(pa.parquet.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as e:
            raise _not_readable(path, "parquet", e) from None
    try:
        if _is_ipc_file(path):
            return list(pa.ipc.open_file(path).schema.names)
        with pa.OSFile(path) as f:
            return list(pa.ipc.open_stream(f).schema.names)
    except (pa.ArrowException, OSError) as e:
        raise _not_readable(path, "Arrow IPC", e) from None


def _clean(row: dict) -> dict:
    """Columns that are null in this row are absent (mixed-format files hold nulls in the other formats' columns)."""
    return {k: v for k, v in row.items() if v is not None}


class _RowFile:
    """Rows of one parquet / arrow file, a record batch at a time. read() -> dict, or None at the end.

    Batches are converted to Python only when a row of them is read, so skipping ahead (resume, re-reading a saved
    shuffle buffer) costs I/O, not conversion."""

    def __init__(self, path: str):
        self.path = path
        self.kind = "parquet" if path.endswith(".parquet") else "Arrow IPC"
        self.pa = _pyarrow(path)
        self._file = None
        self._batches = iter(())
        self._batch = None  # current record batch
        self._rows: list[dict] | None = None  # its rows as dicts, once needed
        self._start = 0  # row index of the current batch's first row
        self._at = 0  # next row within the current batch
        self._group_ends: list[int] = []  # parquet: cumulative rows per row group
        self._reopen(0)

    def _fail(self, e: BaseException) -> TaskError:
        return _not_readable(self.path, self.kind, e)

    def _reopen(self, row: int):
        """Start the batch iterator at the batch (parquet: the row group) holding `row`, without decoding before it."""
        pa = self.pa
        self.close()
        start = 0
        try:
            if self.kind == "parquet":
                pf = pa.parquet.ParquetFile(self.path)
                meta = pf.metadata
                ends, acc = [], 0
                for g in range(meta.num_row_groups):
                    acc += meta.row_group(g).num_rows
                    ends.append(acc)
                self._group_ends = ends
                group = sum(1 for e in ends if e <= row)
                start = ends[group - 1] if group else 0
                groups = list(range(group, len(ends)))
                self._file = pf
                self._batches = pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups) if groups else iter(())
            elif _is_ipc_file(self.path):
                reader = pa.ipc.open_file(self.path)
                self._batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                self._file = pa.OSFile(self.path)
                self._batches = iter(pa.ipc.open_stream(self._file))
        except (pa.ArrowException, OSError) as e:
            raise self._fail(e) from None
        self._batch, self._rows, self._start, self._at = None, None, start, 0

    def _next_batch(self) -> bool:
        if self._batch is not None:
            self._start += self._batch.num_rows
        try:
            self._batch = next(self._batches, None)
        except (self.pa.ArrowException, OSError) as e:
            raise self._fail(e) from None
        self._rows, self._at = None, 0
        return self._batch is not None

    def _group_of(self, row: int) -> int:
        return sum(1 for e in self._group_ends if e <= row)

    def seek(self, row: int):
        """Go to row `row`: forward within the file by dropping whole batches; backward (or, for parquet, into a
        later row group) by reopening at its row group."""
        here = self._start + self._at
        if row < here or (self.kind == "parquet" and self._group_of(row) != self._group_of(here)):
            self._reopen(row)
        while self._batch is None or self._start + self._batch.num_rows <= row:
            if not self._next_batch():
                return
        self._at = max(0, row - self._start)

    def read(self) -> dict | None:
        while self._batch is None or self._at >= self._batch.num_rows:
            if not self._next_batch():
                return None
        if self._rows is None:
            self._rows = self._batch.to_pylist()
        row = self._rows[self._at]
        self._at += 1
        return _clean(row)

    def state(self) -> dict | None:
        return None

    def close(self):
        if self._file is not None and hasattr(self._file, "close"):
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_rows(path: str, rows: list[int]) -> dict[int, dict]:
    """The given rows of a parquet / arrow file (for a resumed shuffle buffer), in one forward pass; rows past the
    end are left out."""
    out: dict[int, dict] = {}
    with _RowFile(path) as f:
        for r in sorted(set(rows)):
            f.seek(r)
            row = f.read()
            if row is None:
                break
            out[r] = row
    return out


def save_to_disk_files(folder: str, entry: str) -> tuple[str, ...] | None:
    """The arrow files of a `Dataset.save_to_disk` folder in order, or None if `folder` is not one."""
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            raise TaskError(
                f"'{entry}' is a DatasetDict saved with save_to_disk; name one split's folder, "
                f"e.g. {os.path.join(folder, splits[0] if splits else 'train')}"
            )
        return None
    try:
        with open(state) as fh:
            names = [d["filename"] for d in json.load(fh)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TaskError(
            f"'{entry}': {state} is not a datasets save_to_disk state ({e}); save the dataset again with "
            f"Dataset.save_to_disk"
        ) from None
    files = tuple(os.path.join(folder, n) for n in names)
    for f in files:
        if not os.path.isfile(f):
            raise TaskError(f"'{entry}': {f}, listed in state.json, is missing; save the dataset again")
    return files


# ---------------------------------------------------------------------------------------------- hf: datasets
@dataclass(frozen=True)
class HFSource:
    name: str  # ORG/NAME
    split: str
    config: str | None

    @property
    def path(self) -> str:
        return f"{HF_PREFIX}{self.name}@{self.split}" + (f"#{self.config}" if self.config else "")

    def load_call(self) -> str:
        cfg = f", {self.config!r}" if self.config else ""
        return f"datasets.load_dataset({self.name!r}{cfg}, split={self.split!r})"


def parse_hf(entry: str, path: str) -> HFSource:
    body = path[len(HF_PREFIX) :]
    body, _, config = body.partition("#")
    name, _, split = body.partition("@")
    if not name or name.count("/") > 1 or (_ and not split) or ("#" in path and not config):
        raise TaskError(
            f"'{entry}': write hub datasets as hf:ORG/NAME[@split][#config], e.g. hf:OpenAssistant/oasst1@train"
        )
    return HFSource(name.strip(), (split or "train").strip(), config.strip() or None)


_HF_CACHE: dict[HFSource, Any] = {}


def _datasets_module(src: HFSource):
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{src.path} needs the datasets package; pip install 'datasets>=2.18'") from None
    version = datasets.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_DATASETS:
        raise TaskError(
            f"{src.path} needs datasets >= {'.'.join(map(str, MIN_DATASETS))} (for exact resume), installed "
            f"{version}; pip install -U 'datasets>=2.18'"
        )
    return datasets


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )


def load_hf(src: HFSource):
    """The IterableDataset of `src` (loaded once per process; readers iterate a _fresh() one each)."""
    if src in _HF_CACHE:
        return _HF_CACHE[src]
    datasets = _datasets_module(src)
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)
    except (ConnectionError, TimeoutError) as e:
        raise TaskError(
            f"{src.path}: not in the local Hugging Face cache (HF_HOME={_hf_home()}) and the hub cannot be reached "
            f"({type(e).__name__}); on a machine with network run `{src.load_call()}` with the same HF_HOME and "
            f"copy that folder here (set HF_HUB_OFFLINE=1 on nodes without network)"
        ) from None
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        raise TaskError(f"{src.path}: {msg}; check the @split and #config names (hf:ORG/NAME@split#config)") from None
    except Exception as e:
        if type(e).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError"):
            raise TaskError(
                f"{src.path}: {' '.join(str(e).split())}; check the name, or pre-download it with `{src.load_call()}`"
            ) from None
        raise
    splits = getattr(ds.info, "splits", None) or {}
    info = splits.get(src.split) if hasattr(splits, "get") else None
    if (info is not None and info.num_examples == 0) or next(iter(_fresh(ds)), None) is None:
        raise TaskError(f"{src.path}: split '{src.split}' has no records; pick another split with @split")
    _HF_CACHE[src] = ds
    return ds


def _fresh(ds):
    """An independent IterableDataset over the same data: iterations keep their position in their own objects, so
    two readers (and threads) must not share one. (A deep copy would also copy, racily, fsspec's caches.)"""
    return ds.shard(num_shards=1, index=0)


def hf_columns(src: HFSource) -> list[str] | None:
    features = load_hf(src).features
    return list(features) if features is not None else None


def hf_signature(src: HFSource) -> list:
    """Identifies the cached data: record count and bytes when the dataset info has them (else None)."""
    ds = load_hf(src)
    splits = getattr(ds.info, "splits", None) or {}
    info = splits.get(src.split) if hasattr(splits, "get") else None
    return [src.path, getattr(info, "num_examples", None), getattr(info, "num_bytes", None)]


class _HFStream:
    """Records of one hf: source in order; state() is the IterableDataset's own position."""

    def __init__(self, src: HFSource):
        self.src = src
        self._ds = _fresh(load_hf(src))
        self._it = None

    def seek(self, count: int, state: dict | None = None):
        self._ds = _fresh(load_hf(self.src))
        if state is not None:
            self._ds.load_state_dict(state)
            self._it = iter(self._ds)
            return
        self._it = iter(self._ds)
        for _ in range(count):  # no saved IterableDataset state: skip records
            if next(self._it, None) is None:
                break

    def read(self) -> dict | None:
        if self._it is None:
            self._it = iter(self._ds)
        row = next(self._it, None)
        return None if row is None else _clean(row)

    def state(self) -> dict | None:
        return self._ds.state_dict() if self._it is not None else None

    def close(self):
        self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_rows(path: str):
    """A row reader (read() -> dict | None, seek, state, close) for a parquet / arrow file or an hf: source."""
    if is_hf(path):
        return _HFStream(parse_hf(path, path))
    return _RowFile(path)


def columns_of(path: str) -> list[str] | None:
    if is_hf(path):
        return hf_columns(parse_hf(path, path))
    return schema_of(path) if is_rows(path) else None


def signature(path: str) -> list:
    """What resume compares to decide whether a data file changed: name and size (hf: record count)."""
    if is_hf(path):
        return hf_signature(parse_hf(path, path))
    return [os.path.basename(path), os.stat(path).st_size]


def iter_records(files: Iterable[str]) -> Iterator[tuple[str, int, bytes | dict]]:
    """(path, line_no, payload) of every record of the files in order: raw lines for jsonl (blank lines skipped),
    dicts for rows (line_no = row index + 1)."""
    for path in files:
        if is_rows(path):
            with open_rows(path) as fh:
                n = 0
                while (row := fh.read()) is not None:
                    n += 1
                    yield path, n, row
            continue
        with open_jsonl(path) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.isspace():
                    yield path, line_no, line
