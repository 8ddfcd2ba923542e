"""Issue #30's targets on this machine's CPUs: the token cache (tools/prepare_data.py, --task-name CACHE_DIR).

30.1 build: tokens/s of build_cache over a synthetic mixed jsonl (bench_data.py's records, chat and OIG text), with
     one worker process per usable core (tools/prepare_data.py's default); its start-up (the first chunk's arrival:
     the workers' forkserver imports torch and transformers once per process) and the rate after it; the peak memory
     of the build's processes (the ceiling: the shuffle buffer, the chunks in flight and each worker's own pages,
     independent of the data's size). Target >= 2M tokens/s on the 16-core GPU host, >= 400k on 2 cores.
30.2 per-replica data cost at a simulated dp = 32 (one process reading as replica 0 of 32): CPU seconds per batch
     of today's PackedStream (which tokenizes the whole stream to keep its rows) against CachedStream (which reads
     its own windows). Target: the cache's <= 1/20 of the stream's.
30.3 launch to the first batch on a 10 GB cache: a cache whose arrays are 10 GB (sparse files: their size is what
     opening and reading them depends on, not their contents) opened and its first batch read, at a late window.
     Target <= 2 s.

  python bench/bench_token_cache.py --out /tmp/bench_token_cache.json      # ~1-2 min on 2 cores
  python bench/bench_token_cache.py --build-workers 1,2,4,8,16 --build-kinds processes,threads --out ...

"build" is the first build: the first --build-kinds kind (default processes) at the first --build-workers count
(default: one per usable core, prepare_data's default). With several, "build_sweep" holds one build per kind and
count, each into a fresh folder, each row naming its kind: processes (tasks/build_workers.py: one core each) or
threads (the training loader's pool in this process: each thread's encoding on every core). The first processes
build also starts the forkserver; later ones in the same run reuse it (see first_chunk_s). peak_memory_mb: the
largest sum, sampled every 0.2 s, of the proportional set size (shared pages split among their sharers) of this
process and its children (the workers, their forkserver); worker_uss_mb: the largest a single worker held alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data import generate  # noqa: E402

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer")


def cpu_seconds_per_batch(stream, batches: int) -> float:
    next(stream)  # warm-up
    start = time.process_time()
    for _ in range(batches):
        next(stream)
    return (time.process_time() - start) / batches


def rust_encode_rate(tok) -> dict:
    """Tokens/s of the Rust backend alone on one large batch, from one thread: its own thread pool's use of the
    cores, the ceiling the build's threads share (the rest of a build holds the GIL)."""
    backend = tok.backend_tokenizer
    texts = [" ".join(f"word{(i * 7 + j) % 1000} and more text" for j in range(200)) for i in range(4000)]
    backend.encode_batch_fast(texts[:8])
    started = time.perf_counter()
    tokens = sum(len(e.ids) for e in backend.encode_batch_fast(texts))
    return {"tokens": tokens, "tokens_per_s": round(tokens / (time.perf_counter() - started))}


class MemoryWatch:
    """Samples, in a thread, the memory of this process and its children (the build's workers and forkserver)."""

    def __init__(self, every_s: float = 0.2):
        import threading

        try:
            import psutil
        except ImportError:  # the numbers are left out
            psutil = None
        self.psutil, self.every_s = psutil, every_s
        self.peak_pss = self.worker_uss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.psutil is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            total, processes = 0, [me, *me.children(recursive=True)]
            for process in processes:
                try:
                    info = process.memory_full_info()
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                total += info.pss
                if process.pid != me.pid and process.ppid() != me.pid:  # a worker: the forkserver's child
                    self.worker_uss = max(self.worker_uss, info.uss)
            self.peak_pss = max(self.peak_pss, total)
            self._stop.wait(self.every_s)

    def numbers(self) -> dict:
        if self.psutil is None:
            return {}
        return {"peak_memory_mb": round(self.peak_pss / 2**20), "worker_uss_mb": round(self.worker_uss / 2**20)}


def time_build(build_cache, data, tok, folder: str, tokens: int, workers: int, kind: str) -> dict:
    """One build, timed: its whole rate and, from its first progress line (logged as the first chunk arrives), its
    start-up and the rate after it."""
    first_chunk = []
    started = time.perf_counter()
    with MemoryWatch() as memory:
        index = build_cache(
            data, tok, folder, tokens, log=lambda m: first_chunk.append(time.perf_counter()), workers=workers, kind=kind
        )
    seconds = time.perf_counter() - started
    start_s = (first_chunk[0] if first_chunk else started) - started
    return {
        "kind": kind,
        "workers": workers,
        "tokens": index["tokens"],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(index["tokens"] / seconds),
        "first_chunk_s": round(start_s, 2),
        "tokens_per_s_after_first_chunk": round(index["tokens"] / max(seconds - start_s, 1e-9)),
        **memory.numbers(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--size-mb", type=float, default=30.0)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dp", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per stream in 30.2")
    ap.add_argument("--big-gb", type=float, default=10.0)
    ap.add_argument(
        "--build-workers",
        default=None,
        help="comma-separated counts of build workers to time 30.1 at (default: one per usable core, prepare_data's)",
    )
    ap.add_argument(
        "--build-kinds",
        default="processes",
        help="comma-separated kinds of build workers to time at each count: processes (prepare_data's), threads",
    )
    args = ap.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    from config import DataConfig
    from tasks import CachedStream, PackedStream
    from tasks.cache import ARRAYS, BUILD_KINDS, INDEX, build_cache
    from utils.host import usable_cores

    if args.build_workers:
        counts = [int(w) for w in args.build_workers.split(",") if w.strip()]
        if not counts or min(counts) < 1:
            ap.error("--build-workers takes counts >= 1, e.g. 1,2,4,8,16")
    else:
        counts = [usable_cores()]
    kinds = [k.strip() for k in args.build_kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(BUILD_KINDS):
        ap.error(f"--build-kinds takes {', '.join(BUILD_KINDS)}")

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    work = tempfile.mkdtemp(prefix="bench_token_cache_")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cores(),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
        "machine": platform.processor() or platform.machine(),
        "commit": os.environ.get("BENCH_COMMIT", "unknown"),
    }
    try:
        source = os.path.join(work, "mixed.jsonl")
        child = multiprocessing.get_context("spawn").Process(
            target=generate, args=(source, args.size_mb, "mixed", "jsonl")
        )
        child.start()
        child.join()
        # 30.1: a whole pass over the file, roughly (the mixture's one task loops; stop near one pass)
        tokens_wanted = int(args.size_mb * 2**20 / 4.2)
        sweep = []
        builds = [(kind, workers) for kind in kinds for workers in counts]
        for k, (kind, workers) in enumerate(builds):
            data = DataConfig(task_spec=source, seq_length=args.seq_length, batch_size=args.batch_size)
            sweep.append(
                time_build(build_cache, data, tok, os.path.join(work, f"cache-{k}"), tokens_wanted, workers, kind)
            )
            if len(builds) > 1:
                print(json.dumps(sweep[-1]), flush=True)
            if k:
                shutil.rmtree(os.path.join(work, f"cache-{k}"), ignore_errors=True)
        os.rename(os.path.join(work, "cache-0"), os.path.join(work, "cache"))
        with open(os.path.join(work, "cache", INDEX)) as f:
            index = json.load(f)  # the first build's, which 30.2 and 30.3 read
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["build"] = {
            **sweep[0],
            "peak_rss_mb": round(peak_mb),
            "source_mb": round(os.path.getsize(source) / 2**20, 1),
        }
        if len(sweep) > 1:
            result["build_sweep"] = sweep
            result["build"]["peak_rss_mb_note"] = "this process's own, the largest over every build of the sweep"
        print(json.dumps(result["build"]), flush=True)
        # what the tokenizer alone does on these cores (after the build, whose peak memory that was)
        result["rust_encode"] = rust_encode_rate(tok)
        print(json.dumps(result["rust_encode"]), flush=True)

        # 30.2: replica 0 of dp replicas, both ways, on the training thread (workers 0: its CPU time is its cost)
        one = DataConfig(task_spec=source, seq_length=args.seq_length, batch_size=1, workers=0)
        raw = PackedStream(one, tok, 0, args.dp)
        raw_s = cpu_seconds_per_batch(raw, args.batches)
        raw.close()
        cached_data = DataConfig(
            task_spec=os.path.join(work, "cache"), seq_length=args.seq_length, batch_size=1, workers=0
        )
        cached = CachedStream(cached_data, tok, 0, args.dp)
        cached_s = cpu_seconds_per_batch(cached, args.batches)
        cached.close()
        result["replica_cost"] = {
            "dp": args.dp,
            "batch_per_replica": 1,
            "stream_cpu_s_per_batch": raw_s,
            "cache_cpu_s_per_batch": cached_s,
            "ratio": cached_s / raw_s,
        }
        print(json.dumps(result["replica_cost"]), flush=True)

        # 30.3: a 10 GB cache (sparse arrays), opened and read at a late window
        big = os.path.join(work, "big")
        os.makedirs(os.path.join(big, "build-big"))
        tokens = int(args.big_gb * 2**30 / 6)  # 4 + 1 + 1 bytes a token
        for name, dtype in ARRAYS.items():
            with open(os.path.join(big, "build-big", f"{name}.bin"), "wb") as f:
                f.truncate(tokens * np.dtype(dtype).itemsize)
        with open(os.path.join(big, "build-big", "epochs.json"), "w") as f:
            json.dump({"mixed": [0]}, f)
        with open(os.path.join(big, INDEX), "w") as f:
            json.dump({**index, "build": "build-big", "tokens": tokens}, f)
        started = time.perf_counter()
        stream = CachedStream(
            DataConfig(task_spec=big, seq_length=args.seq_length, batch_size=args.batch_size, workers=0), tok, 0, 8
        )
        late = {**stream.state_dict(), "windows": (tokens // args.seq_length) - 8 * args.batch_size - 1}
        stream.load_state_dict(late)
        next(stream)
        first = time.perf_counter() - started
        stream.close()
        result["first_batch"] = {"cache_gb": round(tokens * 6 / 2**30, 1), "seconds": round(first, 4)}
        print(json.dumps(result["first_batch"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["targets"] = {
        "30.1 build tokens/s": result["build"]["tokens_per_s"],
        "30.2 cache / stream CPU per replica batch (<= 0.05)": result["replica_cost"]["ratio"],
        "30.3 first batch of a 10 GB cache, s (<= 2)": result["first_batch"]["seconds"],
    }
    print(json.dumps(result["targets"], indent=1))
    out = args.out or os.path.join(os.environ.get("OUT") or "runs/bench", "bench_token_cache.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
