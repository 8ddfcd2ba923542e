"""Where one GPU's training step goes: our trainer under torch.profiler, GPU kernel time by kind.

Runs the real entrypoint with `--profiling pytorch_profiling` (two traced optimizer steps after a warm-up step), then
reads the Chrome trace of rank 0 and sums the GPU kernels' time by kind: matmul (cuBLAS / CUTLASS / nvjet / triton
mm), attention (flash / cuDNN / efficient / flex), optimizer (multi-tensor / fused Adam), copies and memsets,
collectives, float8 casts (`--fp8`'s absolute maxima and clamped casts: any kernel named after amax, abs+max or
clamp), everything else (elementwise, norms, rotary, cross-entropy: fused or not). "GPU idle" is the step's wall
time not covered by any kernel. Numbers of a traced step are a little slower than an untraced one: the profile says
where time goes, bench_single_gpu.py says how fast.

    python bench/profile_step.py --variant mb8+compile          # one H100/H200
    python bench/profile_step.py --shape pythia-6.9b --layers 16 --batch-size 4 --variant mb1+compile+fp8
                                                                # the float8 step of bench_fp8.py's 6.9B row (#31.4)
    python bench/profile_step.py --smoke                        # CPU check of the plumbing (no GPU kernels)
"""

import argparse
import collections
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_single_gpu import parse_variant, run_variant  # noqa: E402
from common import Session, add_common_args, apply_smoke  # noqa: E402

KINDS = [  # first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "flex", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "_mm_", "mm_kernel", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("collective", ("nccl",)),
    ("copy/memset", ("memcpy", "memset", "copy_kernel", "fill")),
    # --fp8: finding each operand's scale (an absolute max) and casting it; inductor names its fused kernels after them
    ("float8 casts", ("amax", "abs_max", "clamp")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, words in KINDS:
        if any(w in low for w in words):
            return kind
    return "other"


def summarize_trace(path: str, top: int = 30) -> dict:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    steps = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("step")]
    if not kernels:
        return {"kernels": 0}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    by_kind = collections.Counter()
    by_name = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        by_kind[kind_of(e["name"])] += e["dur"]
        by_name[e["name"][:120]] += e["dur"]
        count[e["name"][:120]] += 1
    busy = _union_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    span = end - start
    cpu_ops = [
        e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime")
    ]
    return {
        "trace": os.path.basename(path),
        "span_ms": round(span / 1e3, 1),
        "gpu_busy_ms": round(busy / 1e3, 1),
        "gpu_idle_share": round(1 - busy / span, 4),
        "profiler_steps": [s["name"] for s in steps],
        "by_kind_ms": {k: round(v / 1e3, 1) for k, v in by_kind.most_common()},
        "by_kind_share_of_busy": {k: round(v / busy, 4) for k, v in by_kind.most_common()},
        "syncs": _syncs(cpu_ops),
        "idle_gaps": _idle_gaps(kernels, cpu_ops),
        "top_kernels": [
            {"name": n, "ms": round(t / 1e3, 2), "calls": count[n], "kind": kind_of(n)}
            for n, t in by_name.most_common(top)
        ],
    }


def _enclosing(cpu_ops, ts, end, limit=6):
    """Names of the CPU ops running over [ts, end], outermost first (what the host was doing then)."""
    around = [e for e in cpu_ops if e["ts"] <= ts and e["ts"] + e["dur"] >= end]
    return [e["name"][:60] for e in sorted(around, key=lambda e: -e["dur"])][:limit]


def _syncs(cpu_ops):
    """Every host wait on the GPU, with what the host was inside of."""
    waits = [e for e in cpu_ops if "Synchronize" in e["name"] or e["name"] == "aten::_local_scalar_dense"]
    return [
        {"name": e["name"], "ms": round(e["dur"] / 1e3, 2), "inside": _enclosing(cpu_ops, e["ts"], e["ts"] + e["dur"])}
        for e in sorted(waits, key=lambda e: e["ts"])
    ]


def _idle_gaps(kernels, cpu_ops, min_us=300):
    """GPU gaps longer than `min_us` and the host ops that overlapped them."""
    gaps, ordered = [], sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    cursor = ordered[0][1]
    for a, b in ordered[1:]:
        if a - cursor > min_us:
            during = [e for e in cpu_ops if e["ts"] < a and e["ts"] + e["dur"] > cursor]
            names = collections.Counter(e["name"][:60] for e in during)
            gaps.append(
                {"at_ms": round(cursor / 1e3, 1), "ms": round((a - cursor) / 1e3, 2), "host": names.most_common(8)}
            )
        cursor = max(cursor, b)
    return gaps


def _union_length(intervals):
    total, cur_start, cur_end = 0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, steps=4, warmup=1)
    ap.add_argument("--shape", default="pythia-1.4b")
    ap.add_argument("--layers", type=int, default=0, help="train this many of the shape's layers (0: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variant", default="mb8+compile", help="as in bench_single_gpu.py")
    ap.add_argument("--profiling-steps", type=int, default=2)
    args = ap.parse_args()
    apply_smoke(args, ap)
    s = Session("profile_step", args)
    shape = "tiny" if args.smoke else args.shape
    v = parse_variant(args.variant, args.batch_size)
    model_dir = s.model_dir(shape, None if args.smoke else args.layers or None)
    data = s.data_file(v["batch"] * args.seq_length * (args.steps + 2) * 2)
    trace_dir = os.path.join(s.workdir, "trace")
    profiling = ("--profiling", "pytorch_profiling", "--profiling-dir", trace_dir)
    run = run_variant(
        s, v, args.variant, model_dir, data, extra=(*profiling, "--profiling-steps", str(args.profiling_steps))
    )
    traces = sorted(glob.glob(os.path.join(trace_dir, "torch_rank_0*.json")))
    run["profile"] = summarize_trace(traces[0]) if traces else {"error": f"no trace in {trace_dir}"}
    p = run["profile"]
    if "by_kind_ms" in p:
        s.note(
            f"traced span {p['span_ms']} ms, GPU idle {p['gpu_idle_share']:.1%}; busy by kind: "
            + ", ".join(f"{k} {v:.1%}" for k, v in p["by_kind_share_of_busy"].items())
        )
        for g in p["idle_gaps"]:
            print(f"  idle {g['ms']:7.2f} ms; host: {g['host']}")
        for w in p["syncs"]:
            print(f"  sync {w['ms']:7.2f} ms {w['name']} inside {w['inside']}")
        for k in p["top_kernels"][:15]:
            print(f"  {k['ms']:9.2f} ms  {k['calls']:5d}x  {k['kind']:11s} {k['name'][:100]}")
    s.finish()


if __name__ == "__main__":
    main()
