"""Issue 15, targets 1 and 2: --dp-mode sharded and --offload-optimizer cpu (bf16, AdamW, seq 2048).

target 1 (2 GPUs, Pythia-1.4B shape, dp=2): sharded optimizer memory per GPU <= 0.55 x allreduce's, tokens/s
         >= 0.97 x allreduce. The optimizer's share is 12 bytes per parameter under allreduce (fp32 master + two
         moments) and 12/dp under sharded; the measured share of the sharded run is its peak minus what the
         allreduce run holds besides its optimizer: (peak_sharded - (peak_allreduce - 12 N)) / 12 N.
target 2 (1 GPU, Pythia-6.9B shape): --offload-optimizer cpu: peak GPU allocated <= 40 GB, tokens/s >= 0.5 x the
         same run without offload; the host's peak resident memory of the offloaded run is reported.

  python bench/bench_sharded.py --target 1          # 2 GPUs
  python bench/bench_sharded.py --target 2          # 1 GPU
  python bench/bench_sharded.py --smoke             # CPU check (gloo): both pairs on the tiny shape
"""

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SHAPES, Session, add_common_args, apply_smoke, ratio  # noqa: E402


def params(shape):
    s = SHAPES[shape]
    h, n_layers, vocab = s["hidden_size"], s["num_layers"], s["vocab_size"]
    return n_layers * (12 * h * h + 13 * h) + 2 * vocab * h + 2 * h


def child_max_rss_gb():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--target", type=int, choices=(1, 2), default=1)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per replica per step")
    args = ap.parse_args()
    apply_smoke(args, ap)
    shape = "pythia-1.4b" if args.target == 1 else "pythia-6.9b"
    if args.smoke:
        shape, args.micro_batch_size, args.batch_size = "tiny", 2, 4
    dp = 2 if args.target == 1 else 1
    s = Session(f"bench_sharded_t{args.target}", args)
    common = dict(
        model_dir=s.model_dir(shape),
        data=s.data_file(args.steps * args.batch_size * dp * args.seq_length),
        micro_batch=args.micro_batch_size,
        batch=args.batch_size,
        optimizer="adamw",
        nproc=dp,
        dp=dp,
    )
    n = params(shape)
    if args.target == 1:
        ref = s.ours(f"allreduce dp{dp}", **common)
        sharded = s.ours(f"sharded dp{dp}", extra=["--dp-mode", "sharded"], **common)
        share = None
        if ref.get("max_mem_gb") is not None and sharded.get("max_mem_gb") is not None:
            optimizer_gb = 12 * n / 2**30
            share = (sharded["max_mem_gb"] - (ref["max_mem_gb"] - optimizer_gb)) / optimizer_gb
        s.target(
            "1: sharded optimizer memory / allreduce's",
            share,
            0.55,
            compare="<=",
            detail=f"N={n:,}; allreduce optimizer share 12N = {12 * n / 2**30:.1f} GB",
            ours=sharded,
            reference=ref,
        )
        s.target(
            "1: sharded tok/s / allreduce tok/s",
            ratio(sharded.get("tokens_per_s"), ref.get("tokens_per_s")),
            0.97,
            ours=sharded,
            reference=ref,
        )
    else:
        ref = s.ours("device optimizer", **common)
        before = child_max_rss_gb()
        offload = s.ours("--offload-optimizer cpu", extra=["--offload-optimizer", "cpu"], **common)
        host = child_max_rss_gb()
        offload["host_max_rss_gb"] = round(host, 1) if host > before else None
        s.target(
            "2: offload peak GPU GB",
            offload.get("max_mem_gb"),
            40.0,
            compare="<=",
            detail=f"host peak RSS {offload['host_max_rss_gb']} GB (largest child process)",
            ours=offload,
        )
        s.target(
            "2: offload tok/s / device-optimizer tok/s",
            ratio(offload.get("tokens_per_s"), ref.get("tokens_per_s")),
            0.5,
            ours=offload,
            reference=ref,
        )
    s.finish(extra={"shape_name": shape, "dp": dp, "params": n})


if __name__ == "__main__":
    main()
