"""Data-pipeline throughput: packed tokens/s of tasks.PackedStream with the GPT-2 tokenizer.

Generates a synthetic OIG-style dataset (a few tens of MB of `{"text": "<human>: ...\\n<bot>: ..."}` records,
optionally chat `messages` records) in a temp dir, then times next(stream) on the training thread, as the trainer
would call it, after one warm-up batch.

    python bench/bench_data.py --out /tmp/bench_data.json
    python bench/bench_data.py --size-mb 40 --format mixed --num-workers 2 --seconds 30
    python bench/bench_data.py --source parquet --out /tmp/bench_parquet.json   # same records as a .parquet file

Peak RSS (ru_maxrss) is reported for the timing process; the data are generated in a child process so that the
peak is the stream's own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON = (
    "the of and to in is was for that with as on by at from his her an which or be are it this had not but "
    "have were one their all been has also its new who more after first two other when time into only some "
    "year over people could would about many most these then than what your how there know make like "
    "water history city music world school family country river system number between during under "
    "because through government company important example different question answer explain simple"
).split()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYLLABLES = "ka ri to ma ne so lu vi de pa qua zer ion ent ush ol am ex tri gon ber ly ish ment".split()


def make_words(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.75:
            out.append(rng.choice(COMMON))
        elif r < 0.93:
            out.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
        else:
            out.append(str(rng.randint(0, 100000)))
        if rng.random() < 0.08:
            out[-1] += rng.choice([",", ".", "?", ";"])
    return " ".join(out)


def make_dataset(path: str, size_mb: float, fmt: str, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(size_mb * 2**20)
    n = written = 0
    with open(path, "w") as fh:
        while written < target:
            turns = [
                (make_words(rng, rng.randint(8, 40)) + "?", make_words(rng, rng.randint(20, 200)) + ".")
                for _ in range(rng.randint(1, 3))
            ]
            if fmt == "messages" or (fmt == "mixed" and n % 2):
                msgs = []
                for q, a in turns:
                    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                line = json.dumps({"messages": msgs})
            else:
                line = json.dumps({"text": "\n".join(f"<human>: {q}\n<bot>: {a}" for q, a in turns)})
            fh.write(line + "\n")
            written += len(line) + 1
            n += 1
    return n


def jsonl_to_parquet(src: str, dst: str, rows_per_group: int = 10_000):
    """Stream a jsonl file into parquet (row groups of `rows_per_group`), never holding the whole file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("text", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ]
    )
    tmp = dst + ".tmp"
    with pq.ParquetWriter(tmp, schema) as writer, open(src) as fh:
        rows: list[dict] = []
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    os.replace(tmp, dst)


def generate(path: str, size_mb: float, fmt: str, source: str):
    jsonl = path if source == "jsonl" else path[: -len(".parquet")] + ".jsonl"
    if not os.path.exists(jsonl):
        make_dataset(jsonl, size_mb, fmt)
    if source == "parquet":
        jsonl_to_parquet(jsonl, path)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--size-mb", type=float, default=30.0)
    ap.add_argument("--format", choices=["text", "messages", "mixed"], default="text")
    ap.add_argument("--source", choices=["jsonl", "parquet"], default="jsonl", help="file type the stream reads")
    ap.add_argument(
        "--tokenizer",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer"),
    )
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0, help="stop timing after this long (or one pass)")
    ap.add_argument(
        "--chat-template",
        action="store_true",
        help="give the tokenizer a ChatML template (messages rendered through apply_chat_template)",
    )
    ap.add_argument("--data-dir", help="reuse/generate the dataset here instead of a temp dir")
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from transformers import AutoTokenizer

    from config import DataConfig
    from tasks import PackedStream

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.chat_template:
        tok.chat_template = CHATML
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        data_dir = tmp.name
    os.makedirs(data_dir, exist_ok=True)
    suffix = "jsonl" if args.source == "jsonl" else "parquet"
    path = os.path.join(data_dir, f"synthetic_{args.format}_{args.size_mb:g}mb.{suffix}")
    t0 = time.perf_counter()
    if not os.path.exists(path):
        child = multiprocessing.get_context("spawn").Process(
            target=generate, args=(path, args.size_mb, args.format, args.source)
        )
        child.start()
        child.join()
        if child.exitcode:
            sys.exit(f"generating {path} failed")
        print(
            f"generated {os.path.getsize(path) / 2**20:.1f} MB in {time.perf_counter() - t0:.1f}s: {path}",
            file=sys.stderr,
        )

    data = DataConfig(
        task_spec=path,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    stream = PackedStream(data, tok)
    tokens_per_batch = args.seq_length * args.batch_size
    next(stream)  # warm-up: thread start, first chunks
    rss_warm = rss_mb()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    batches = loss_tokens = 0
    while True:
        b = next(stream)
        batches += 1
        loss_tokens += int((b["labels"] != -100).sum())
        dt = time.perf_counter() - t0
        if dt >= args.seconds or stream.epochs[stream.tasks[0].name] >= 1:
            break
    rss_end = rss_mb()
    stream.close()
    tokens = batches * tokens_per_batch
    result = {
        "benchmark": "tasks.PackedStream packed output",
        "tokens_per_s": round(tokens / dt),
        "tokens": tokens,
        "batches": batches,
        "seconds": round(dt, 3),
        "loss_token_fraction": loss_tokens / tokens,
        "dataset_mb": round(os.path.getsize(path) / 2**20, 1),
        "format": args.format,
        "source": args.source,
        "rss_mb_after_warmup": round(rss_warm, 1),
        "rss_mb_at_end": round(rss_end, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "chat_template": args.chat_template,
        "seq_length": args.seq_length,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "shuffle_buffer": args.shuffle_buffer,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    print(
        f"{result['tokens_per_s']:,} tokens/s packed ({tokens:,} tokens in {dt:.1f}s, {args.source} {args.format}, "
        f"peak RSS {result['peak_rss_mb']} MB, "
        f"{'chat template, ' if args.chat_template else ''}S={args.seq_length} B={args.batch_size} workers={args.num_workers}, {os.cpu_count()} cores)"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
