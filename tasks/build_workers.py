"""A token-cache build's worker processes: each renders and encodes whole chunks of documents with a tokenizer of its
own, on one thread, so the build scales with cores instead of waiting on one interpreter lock.

The building process draws the documents from the mixture (their order, and the progress a resume starts from, stay
there) and deals chunk k to worker k mod N; the arrays come back and are consumed in order, at most
IN_FLIGHT_PER_WORKER chunks per worker ahead. The workers are forked from a `forkserver`: a fresh interpreter that
imports torch and the tokenizer's class once (never a copy of a parent whose tokenizer already ran its thread pool;
later builds in the same process start their workers in a fraction of a second). Each worker gets the renderer once,
its tokenizer travelling as JSON, and builds its Encoder then. Its tokenizer runs on one thread:
TOKENIZERS_PARALLELISM=false makes encode_batch serial (the Rust side reads it at every call), RAYON_NUM_THREADS=1
bounds any pool rayon would still start; so N workers use N cores, not N x cores.

Each worker talks over a pipe of its own, not a ProcessPoolExecutor: the executor's workers share one result pipe and
one lock, so a worker killed while sending its result (the out-of-memory killer picks the largest process) leaves half
a message the executor waits on forever and a lock the others wait on forever; the build hung. Here the end of a
worker's pipe is its death: the build ends with one line. The pipe is also how a worker ends with the building
process, however that ends (Ctrl-C, an error, killed): it reads the end of its pipe and exits.

Memory: IN_FLIGHT_PER_WORKER (2) chunks per worker, each at most 256 documents or about 1 MiB of raw records
(PackedStream's chunk_docs / chunk_bytes; one record may pass the limit) and its result of ~6 bytes a token (~1.5 MB
for 1 MiB of text): ~5 MB a worker. Each worker holds 70-120 MB of its own besides the pages it shares with the
forkserver (~250 MB resident: the interpreter, torch, transformers, the tokenizer), measured with the bundled GPT-2
tokenizer (more with a large vocabulary). So about 0.25 GB + workers x 0.125 GB at most, independent of the data's
size; the forkserver stays, idle, until the process that built ends.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from .spec import TaskError
from .tokenize import Chunk, Encoder

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .packing import ChunkMeta
    from .reader import Mixture
    from .render import Renderer
    from .stream import _Pipeline

IN_FLIGHT_PER_WORKER = 2  # chunks sent ahead per worker: one being encoded, one waiting (every worker stays busy)


def encoded_in_processes(pipe: _Pipeline, mix: Mixture, workers: int):
    """(ChunkMeta, Chunk) of the stream from `mix`'s position on, in order, rendered and encoded by `workers`
    processes; tokens come as uint32. The workers stop when the generator is closed (the build ended, failed or was
    interrupted): the chunks they hold are dropped."""
    files = [t.files for t in pipe.tasks]
    context = multiprocessing.get_context("forkserver")
    # Imported once, in the server the workers are forked from: torch (which tasks imports) and the tokenizer's class,
    # from site-packages. This module may not import there (Python 3.11's server does not take the parent's sys.path);
    # then each worker imports it, torch already in place, in a few hundredths of a second.
    context.set_forkserver_preload(["torch", type(pipe.renderer.tokenizer).__module__, __name__])
    pool: list[_Worker] = []
    pending: deque[tuple[ChunkMeta, _Worker]] = deque()
    try:
        pool.extend(_Worker(context, pipe.renderer) for _ in range(workers))
        for index, (meta, docs) in enumerate(pipe.chunks(mix, 0)):
            worker = pool[index % workers]
            worker.submit((pipe.records(files, docs), meta.drop))
            pending.append((meta, worker))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                meta, worker = pending.popleft()
                yield meta, worker.result()  # a worker's exception (a TaskError naming a bad record) is raised here
    finally:
        for worker in pool:
            worker.stop()


class _Worker:
    """One worker process, its end of the pipe, and a thread that sends it chunks: the building process never waits
    on a send (a chunk larger than the pipe's buffer) while the worker waits for it to read a result."""

    def __init__(self, context, renderer: Renderer):
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, renderer), daemon=True, name="prepare-data-worker")
        try:
            self.process.start()
        except (OSError, EOFError):  # it ended before it had read what it is (killed as it started)
            self.connection.close()
            raise _ended_abruptly("while starting") from None
        finally:
            theirs.close()  # only the worker holds that end now: its death ends this one
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_all, daemon=True, name="prepare-data-send")
        self.sender.start()

    def submit(self, task) -> None:
        self.outbox.put(task)

    def result(self) -> Chunk:
        try:
            ok, value = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            raise _ended_abruptly(f"({_how_it_ended(self.process.exitcode)})") from None
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.process.terminate()  # it holds nothing another process waits on
        self.process.join(timeout=10)
        if self.process.is_alive():  # SIGTERM caught by something it loaded
            self.process.kill()
            self.process.join()
        self.outbox.put(None)
        self.sender.join()  # a send it was in has ended with the worker (a broken pipe)
        self.connection.close()

    def _send_all(self) -> None:
        while (task := self.outbox.get()) is not None:
            try:
                self.connection.send(task)
            except OSError:  # the worker ended: result() says how
                return


def _ended_abruptly(how: str) -> TaskError:
    return TaskError(
        f"prepare_data: a tokenizer worker process ended abruptly {how}; nothing was published: run it again to "
        "continue from the last saved progress (fewer --data-workers use less memory)"
    )


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return "killed: out of memory, or kill -9"
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _serve(connection: Connection, renderer: Renderer) -> None:
    """A worker's life: each chunk it receives, encoded and sent back, until its pipe ends."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the tokenizer first encodes
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    encoder = Encoder(renderer.tokenizer)
    while True:
        try:
            records, drop = connection.recv()
        except (EOFError, OSError):  # the building process ended, however it ended
            return
        try:
            reply = True, _encode(renderer, encoder, records, drop)
        except TaskError as error:  # a bad record, named: the building process raises it
            reply = False, error
        except Exception:  # a defect: its traceback, as text (the exception itself may not pickle)
            reply = False, RuntimeError(f"a tokenizer worker failed:\n{traceback.format_exc()}")
        try:
            connection.send(reply)
        except OSError:
            return


def _encode(renderer: Renderer, encoder: Encoder, records: list[tuple[bytes | dict, str, int]], drop: int) -> Chunk:
    """One chunk, exactly as the loader's threads encode it: each record rendered, then all encoded together."""
    chunk = encoder.encode_chunk([renderer.render_line(*record) for record in records], drop)
    chunk.tokens = chunk.tokens.astype(np.uint32)  # what the cache stores: a smaller result to send back
    return chunk
