"""The iteration half of the training streams (PackedStream, PreferenceStream): batches come from a pipeline's
`batches(resume, stop)` generator of (batch, position after it), either in next() (`workers` 0) or from a
background thread that keeps `prefetch` batches queued. A stream remembers the position of the last batch it handed
out, so its state describes what training consumed, never what was prefetched; an error in the loader is raised
from next(), and from every later next().
"""

from __future__ import annotations

import json
import queue
import sys
import threading

from .spec import TaskError

LOADER_ERROR = object()  # marks an exception handed from the loader thread to next()


class LoaderStream:
    """Base of the streams. A subclass sets `_pipe` (its pipeline), `num_workers`, `prefetch`, `show_data`,
    `show_every` and `_resume` (the JSON state to start from, or None), calls `_init_loader()`, and says how a
    sample is shown (`_show`)."""

    thread_name = "tasks-loader"

    def _init_loader(self) -> None:
        self._consumed = None  # position after the last batch handed out
        self._served = 0
        self._gen = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._error: BaseException | None = None
        self._closed = False

    def _show(self, batch) -> str:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StopIteration
        try:
            if self.num_workers == 0:
                if self._gen is None:
                    self._gen = self._pipe.batches(self._resume, None)
                batch, position = next(self._gen)
            else:
                batch, position = self._take()
        except StopIteration:
            raise RuntimeError("tasks: the training stream ended, which it never should") from None
        except Exception as e:  # the stream is dead: raise the same error from every later next()
            self._error = e
            self._shutdown()
            raise
        self._consumed = position
        if self.show_data and self._served % self.show_every == 0:
            print(self._show(batch), file=sys.stderr, flush=True)
        self._served += 1
        return batch

    def _take(self):
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop = threading.Event()
            # the thread holds the pipeline, not self, so an unclosed stream can still be collected (and __del__
            # stops it)
            self._thread = threading.Thread(
                target=run_loader,
                args=(self._pipe, self._resume, self._queue, self._stop),
                name=self.thread_name,
                daemon=True,
            )
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("tasks: the data loader thread died without reporting an error") from None
        if item[0] is LOADER_ERROR:
            raise item[1]
        return item

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=10)
            self._thread = None
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def _restart_at(self, state: dict) -> None:
        """Drop what was prefetched and continue after the batch a saved `state` was taken at."""
        self._shutdown()
        self._error = None
        self._closed = False
        self._resume = copy_json(state)
        self._consumed = self._resume
        self._served = 0

    def close(self) -> None:
        self._shutdown()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:
            pass


def run_loader(pipe, resume, q: queue.Queue, stop: threading.Event) -> None:
    """The loader thread: `pipe`'s batches into `q` until `stop`; an exception is queued for next() to raise."""
    gen = pipe.batches(resume, stop)

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in gen:
            if not put(item):
                break
    except BaseException as e:  # handed to the consumer, raised from next()
        put((LOADER_ERROR, e))
    finally:
        gen.close()


def copy_json(d):
    return json.loads(json.dumps(d))


def check_same_sources(saved: dict, mine: dict, strict: bool, shuffle_flag: str = "--shuffle-buffer") -> None:
    """Refuse to resume from a saved stream state whose seed, shuffle buffer, tokenizer, tasks or files differ from
    this stream's identity (`mine`), in one line naming the change and the --resume-data way out. strict=False
    accepts files that only changed size: the saved position still names a file and an offset."""
    for key, what in (
        ("seed", "--seed"),
        ("shuffle_buffer", shuffle_flag),
        ("tokenizer", "the tokenizer (vocab/merges/chat template)"),
    ):
        if saved[key] != mine[key]:
            raise TaskError(
                f"cannot resume the data stream: {what} changed since the checkpoint ({saved[key]!r} → "
                f"{mine[key]!r}); restore it, or pass --resume-data restart to read the data from the start"
            )
    old, new = saved["tasks"], mine["tasks"]
    if [(t["name"], t["weight"]) for t in old] != [(t["name"], t["weight"]) for t in new]:
        raise TaskError(
            "cannot resume the data stream: --task-name changed since the checkpoint "
            f"({','.join(t['name'] + ':' + str(t['weight']) for t in old)}); restore it, or pass "
            f"--resume-data restart to read the data from the start"
        )
    for t_old, t_new in zip(old, new):
        resized_only = [f[0] for f in t_old["files"]] == [f[0] for f in t_new["files"]]
        if not resized_only or (strict and t_old["files"] != t_new["files"]):
            go_on = "--resume-data continue to go on at the saved position (not exact) or " if resized_only else ""
            raise TaskError(
                f"cannot resume the data stream: the files of task '{t_new['name']}' changed since the checkpoint "
                f"(was {t_old['files']}, now {t_new['files']}); restore them, or pass {go_on}--resume-data restart "
                f"to read the data from the start"
            )
