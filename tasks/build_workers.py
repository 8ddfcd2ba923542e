"""A token-cache build's worker processes: each renders and encodes whole chunks of documents with a tokenizer of its
own, on one thread, so the build scales with cores instead of waiting on one interpreter lock.

The building process draws the documents from the mixture (their order, and the progress a resume starts from, stay
there) and sends each chunk's raw records to the pool; the arrays come back and are consumed in order, at most
IN_FLIGHT_PER_WORKER chunks per worker ahead. The workers are forked from a `forkserver`: a fresh interpreter that
imports torch and the tokenizer's class once (never a copy of a parent whose tokenizer already ran its thread pool;
later builds in the same process start their workers in a fraction of a second). Each worker gets the renderer once,
its tokenizer travelling as JSON, and builds its Encoder then. Its tokenizer runs on one thread:
TOKENIZERS_PARALLELISM=false makes encode_batch serial (the Rust side reads it at every call), RAYON_NUM_THREADS=1
bounds any pool rayon would still start; so N workers use N cores, not N x cores. A worker ends with the building
process, however that ends (Ctrl-C, an error, killed).

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
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

import numpy as np

from .spec import TaskError
from .tokenize import Chunk, Encoder

if TYPE_CHECKING:
    from .packing import ChunkMeta
    from .reader import Mixture
    from .render import Renderer
    from .stream import _Pipeline

IN_FLIGHT_PER_WORKER = 2  # chunks sent ahead per worker: one being encoded, one waiting (every worker stays busy)

_worker: tuple[Renderer, Encoder] | None = None  # in a worker process: its renderer and encoder


def encoded_in_processes(pipe: _Pipeline, mix: Mixture, workers: int):
    """(ChunkMeta, Chunk) of the stream from `mix`'s position on, in order, rendered and encoded by `workers`
    processes; tokens come as uint32. The pool stops when the generator is closed (the build ended, failed or was
    interrupted): chunks not yet started are dropped, the ones being encoded are waited for."""
    files = [t.files for t in pipe.tasks]
    context = multiprocessing.get_context("forkserver")
    # Imported once, in the server the workers are forked from: torch (which tasks imports) and the tokenizer's class,
    # from site-packages. This module may not import there (Python 3.11's server does not take the parent's sys.path);
    # then each worker imports it, torch already in place, in a few hundredths of a second.
    context.set_forkserver_preload(["torch", type(pipe.renderer.tokenizer).__module__, __name__])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(pipe.renderer,))
    pending: deque[tuple[ChunkMeta, Future]] = deque()
    try:
        for meta, docs in pipe.chunks(mix, 0):
            pending.append((meta, pool.submit(_encode, pipe.records(files, docs), meta.drop)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                meta, future = pending.popleft()
                yield meta, future.result()  # a worker's exception (a TaskError naming a bad record) is raised here
    except BrokenProcessPool:  # from submit or result, whichever comes first
        raise TaskError(
            "prepare_data: a tokenizer worker process ended abruptly (killed, or out of memory); nothing was "
            "published: run it again to continue from the last saved progress (fewer --data-workers use less memory)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(renderer: Renderer) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the tokenizer first encodes
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    # A worker holds both ends of the pool's task pipe, so it would wait forever for the next chunk of a building
    # process that was killed (and keep the forkserver alive): it ends as soon as that process has ended.
    threading.Thread(target=_end_with, args=(multiprocessing.parent_process(),), daemon=True).start()
    global _worker
    _worker = renderer, Encoder(renderer.tokenizer)


def _end_with(parent) -> None:
    parent.join()  # returns once the building process has ended, however it ended
    os._exit(1)


def _encode(records: list[tuple[bytes | dict, str, int]], drop: int) -> Chunk:
    """One chunk, exactly as the loader's threads encode it: each record rendered, then all encoded together."""
    renderer, encoder = _worker
    chunk = encoder.encode_chunk([renderer.render_line(*record) for record in records], drop)
    chunk.tokens = chunk.tokens.astype(np.uint32)  # what the cache stores: a smaller result to send back
    return chunk
