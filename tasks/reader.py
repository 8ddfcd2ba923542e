"""Per-task record readers with a bounded seeded shuffle buffer, and the weighted mixture over tasks.

Randomness is counter based (splitmix64 of seed, stream, counter), so an RNG state is one integer. A reader's state
is its file position (file index, byte offset in the file — the decompressed offset for .gz — and line number; for
parquet / arrow files and hf: sources the row index, plus the IterableDataset state for hf:), its epoch, its RNG
counter and its shuffle buffer; buffered records are kept as raw lines (rows: dicts) and saved as (file, offset,
line) positions — plus the record itself for .gz files and hf: sources, where seeking back is slow or impossible —
so a state stays small.
"""

from __future__ import annotations

import bisect
import json

from . import sources
from .spec import TaskError, TaskSpec

_M64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class CounterRNG:
    """u64 number `counter` of stream (seed, stream_id); state = counter."""

    def __init__(self, seed: int, stream_id: int, counter: int = 0):
        self.base = _splitmix(_splitmix(seed & _M64) ^ stream_id)
        self.counter = counter

    def next64(self) -> int:
        x = _splitmix(self.base ^ _splitmix(self.counter))
        self.counter += 1
        return x

    def below(self, n: int) -> int:
        return (self.next64() * n) >> 64

    def uniform(self) -> float:
        return (self.next64() >> 11) * (1.0 / (1 << 53))


# A buffered record: (raw line bytes or row dict, file index, byte offset of the line or row index, 1-based line
# number or row index + 1)
Item = tuple[bytes | dict, int, int, int]


def record_size(payload: bytes | dict) -> int:
    """Bytes a record holds, roughly (bounds a chunk's size; rows are measured by their string values)."""
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(v) if isinstance(v, str) else len(str(v)) for v in payload.values())


def _row_json(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


class TaskReader:
    def __init__(self, task: TaskSpec, task_index: int, seed: int, buffer_size: int):
        self.task = task
        self.files = task.files
        self.buffer_size = max(1, int(buffer_size))
        self.rng = CounterRNG(seed, 1 + task_index)
        self.file_index = 0
        self.offset = 0
        self.line_no = 0
        self.epoch = 0
        self.draining = False  # all files read this epoch; emptying the buffer
        self.count = 0  # records emitted this epoch
        self.buffer: list[Item] = []
        self.src_state: dict | None = None  # hf: IterableDataset state at `offset`, until its handle opens
        self._fh = None
        self._fh_index = -1

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._fh_index = -1

    def _handle(self):
        if self._fh is None or self._fh_index != self.file_index:
            self.close()
            path = self.files[self.file_index]
            if sources.is_rows(path):
                fh = sources.open_rows(path)
                if self.offset or self.src_state is not None:
                    if sources.is_hf(path):
                        fh.seek(self.offset, self.src_state)
                    else:
                        fh.seek(self.offset)
            else:
                fh = sources.open_jsonl(path)
                if self.offset:
                    fh.seek(self.offset, self.line_no)
            self.src_state = None  # the open handle knows its own position from here on
            self._fh, self._fh_index = fh, self.file_index
        return self._fh

    def _read_line(self) -> Item | None:
        while self.file_index < len(self.files):
            fh = self._handle()
            if not isinstance(fh, sources.JsonlFile):  # a row source: one record per row, offset = row index
                row = fh.read()
                if row is None:
                    self._next_file()
                    continue
                pos = self.offset
                self.offset += 1
                self.line_no += 1
                return (row, self.file_index, pos, self.line_no)
            line = fh.readline()
            if not line:
                self._next_file()
                continue
            pos = self.offset
            self.offset += len(line)
            self.line_no += 1
            if not line.isspace():
                return (line, self.file_index, pos, self.line_no)
        return None

    def _next_file(self):
        self.close()
        self.file_index += 1
        self.offset = 0
        self.line_no = 0
        self.src_state = None

    def next_record(self) -> Item:
        buf = self.buffer
        while True:
            if not self.draining:
                while len(buf) < self.buffer_size:
                    item = self._read_line()
                    if item is None:
                        self.draining = True
                        break
                    buf.append(item)
            if buf:
                j = self.rng.below(len(buf))
                item = buf[j]
                buf[j] = buf[-1]
                buf.pop()
                self.count += 1
                return item
            if self.count == 0:
                raise TaskError(
                    f"task '{self.task.name}' has no records (its files are empty or blank); "
                    f"remove it from --task-name or add data"
                )
            self.epoch += 1
            self.count = 0
            self.close()
            self.file_index, self.offset, self.line_no, self.draining = 0, 0, 0, False
            self.src_state = None

    def _buffered_rows(self, entries) -> dict[tuple[int, int], dict]:
        """The buffered rows of parquet / arrow files, read back by position (one pass per file)."""
        wanted: dict[int, list[int]] = {}
        for entry in entries:
            f = int(entry[0])
            if len(entry) == 3 and sources.is_rows(self.files[f]):
                wanted.setdefault(f, []).append(int(entry[1]))
        out = {}
        for f, rows in wanted.items():
            for r, row in sources.read_rows(self.files[f], rows).items():
                out[(f, r)] = row
        return out

    def path_of(self, item: Item) -> str:
        return self.files[item[1]]

    # -- state --
    def snapshot(self) -> tuple:
        src_state = self.src_state
        if self._fh is not None and self._fh_index == self.file_index and not isinstance(self._fh, sources.JsonlFile):
            src_state = self._fh.state()
        return (
            self.file_index,
            self.offset,
            self.line_no,
            self.epoch,
            self.draining,
            self.count,
            self.rng.counter,
            list(self.buffer),
            src_state,
        )

    def snapshot_to_json(self, snap) -> dict:
        fi, off, ln, epoch, draining, count, ctr, buf, src_state = snap
        out_buf = []
        for line, f, pos, lno in buf:
            path = self.files[f]
            if sources.is_hf(path):  # no random access into a stream: keep the record
                out_buf.append([f, pos, lno, _row_json(line)])
            elif path.endswith(".gz"):
                out_buf.append([f, pos, lno, line.decode("utf-8", "surrogateescape")])
            else:
                out_buf.append([f, pos, lno])
        out = {
            "file": fi,
            "offset": off,
            "line": ln,
            "epoch": epoch,
            "draining": draining,
            "count": count,
            "rng": ctr,
            "buffer": out_buf,
        }
        if src_state is not None:
            out["source_state"] = src_state
        return out

    def load_json(self, d: dict):
        self.close()
        self.file_index, self.offset, self.line_no = int(d["file"]), int(d["offset"]), int(d["line"])
        self.epoch, self.draining, self.count = int(d["epoch"]), bool(d["draining"]), int(d["count"])
        self.rng.counter = int(d["rng"])
        self.src_state = d.get("source_state")
        rows = self._buffered_rows(d["buffer"])
        buf: list[Item] = []
        handles: dict[int, object] = {}
        try:
            for entry in d["buffer"]:
                f, pos, lno = int(entry[0]), int(entry[1]), int(entry[2])
                if sources.is_rows(self.files[f]):
                    line = json.loads(entry[3]) if len(entry) > 3 else rows.get((f, pos))
                    if line is None:
                        raise TaskError(
                            f"cannot resume task '{self.task.name}': {self.files[f]} changed since the "
                            f"checkpoint (no row {pos}); restore the data, or pass --resume-data restart to read "
                            f"the data from the start"
                        )
                elif len(entry) > 3:
                    line = entry[3].encode("utf-8", "surrogateescape")
                else:
                    fh = handles.get(f)
                    if fh is None:
                        fh = handles[f] = open(self.files[f], "rb")
                    fh.seek(pos)
                    line = fh.readline()
                    if not line or line.isspace():
                        raise TaskError(
                            f"cannot resume task '{self.task.name}': {self.files[f]} changed since the "
                            f"checkpoint (no record at byte {pos}); restore the data, or pass "
                            f"--resume-data restart to read the data from the start"
                        )
                buf.append((line, f, pos, lno))
        finally:
            for fh in handles.values():
                fh.close()
        self.buffer = buf
        if self.file_index > len(self.files):
            raise TaskError(
                f"cannot resume task '{self.task.name}': the checkpoint is at file "
                f"#{self.file_index} but the task now has {len(self.files)} files"
            )


class Mixture:
    """Per-document weighted choice of task, then a record from that task's reader."""

    def __init__(self, tasks: list[TaskSpec], seed: int, buffer_size: int):
        self.tasks = tasks
        self.readers = [TaskReader(t, i, seed, buffer_size) for i, t in enumerate(tasks)]
        self.rng = CounterRNG(seed, 0)
        acc, self.cum = 0.0, []
        for t in tasks:
            acc += t.weight
            self.cum.append(acc)

    def next_doc(self) -> tuple[int, Item]:
        if len(self.readers) == 1:
            t = 0
        else:
            t = min(bisect.bisect_right(self.cum, self.rng.uniform() * self.cum[-1]), len(self.readers) - 1)
        return t, self.readers[t].next_record()

    def snapshot(self) -> tuple:
        return (self.rng.counter, [r.snapshot() for r in self.readers])

    def epochs_of(self, snap) -> list[int]:
        return [s[3] for s in snap[1]]

    def snapshot_to_json(self, snap) -> dict:
        return {"rng": snap[0], "tasks": [r.snapshot_to_json(s) for r, s in zip(self.readers, snap[1])]}

    def load_json(self, d: dict):
        if len(d["tasks"]) != len(self.readers):
            raise TaskError("cannot resume: the data state has a different number of tasks than --task-name")
        self.rng.counter = int(d["rng"])
        for r, s in zip(self.readers, d["tasks"]):
            r.load_json(s)

    def close(self):
        for r in self.readers:
            r.close()


def file_signature(path: str) -> list:
    return sources.signature(path)
