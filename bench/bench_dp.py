"""Target 3: data parallelism. Pythia-1.4B shape, seq 2048, dp=2 on 2 GPUs (or pp=2 x dp=2 on 4 GPUs).

  target 3: dp=2, pp=1: tokens/s >= 0.9 x 2 x the one-GPU figure;
            pp=2 x dp=2: tokens/s >= 0.85 x 4 x the one-GPU figure (one GPU training the whole model with the same
            micro-batch and batch per replica); both measured in this call.

Runs, in this order:
  baseline    transformers on 1 GPU, same micro-batch and batch per step per replica; 'x base' is the ratio of
              achieved FLOP/s per GPU (= MFU ratio);
  1 GPU       our trainer, pp=1, dp=1;
  the layout  our trainer, pp x dp GPUs (batch per replica unchanged, so dp times the tokens per step).

    python bench/bench_dp.py                              # 2 GPUs: dp=2
    python bench/bench_dp.py --pp 2 --dp 2 --micro-batch-size 2 --batch-size 64 --compile
                                                          # 4 GPUs: pp=2 x dp=2 (1f1b), 32 micro-batches
    python bench/bench_dp.py --smoke                      # CPU check (gloo)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    SHAPES,
    Session,
    add_common_args,
    apply_smoke,
    baseline_layers_that_fit,  # noqa: E402
    ratio,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--shape", default="pythia-1.4b", choices=sorted(SHAPES))
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per replica per step")
    ap.add_argument("--schedule", default="1f1b", help="pipeline schedule when --pp > 1")
    ap.add_argument("--compile", action="store_true", help="--compile in every run of ours")
    ap.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    args = ap.parse_args()
    apply_smoke(args, ap)
    if args.smoke:
        args.shape, args.micro_batch_size, args.batch_size = "tiny", 2, 4
    if args.batch_size % args.micro_batch_size:
        sys.exit(f"--micro-batch-size {args.micro_batch_size} must divide --batch-size {args.batch_size}")
    layers = SHAPES[args.shape]["num_layers"]
    schedule = args.schedule if args.pp > 1 else "gpipe"  # pp=1 runs a plain micro-batch loop either way

    s = Session("bench_dp", args)
    model = s.model_dir(args.shape)
    data = s.data_file(args.steps * args.batch_size * args.dp * args.seq_length)
    common = dict(
        model_dir=model,
        data=data,
        pp=args.pp,
        micro_batch=args.micro_batch_size,
        batch=args.batch_size,
        schedule=schedule,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
    )

    fit = baseline_layers_that_fit(args.shape, layers, args.micro_batch_size, args.seq_length, s.env["gpu_memory_gb"])
    base = s.baseline(
        f"baseline 1 GPU L{fit}",
        model_dir=s.model_dir(args.shape, fit),
        micro_batch=args.micro_batch_size,
        accum=args.batch_size // args.micro_batch_size,
    )
    if args.pp == 1:
        one = s.ours("ours pp1 dp1", nproc=1, dp=1, **common)
        many = s.ours(f"ours pp1 dp{args.dp}", nproc=args.dp, dp=args.dp, **common)
        s.target(
            f"3: dp{args.dp} tok/s / ({args.dp} x dp1 tok/s)",
            ratio(many.get("tokens_per_s"), one.get("tokens_per_s") and args.dp * one["tokens_per_s"]),
            0.9,
            ours=many,
            reference=one,
        )
    else:  # the whole layout against ONE GPU training the whole model with the same batch per replica
        one = s.ours("ours 1 GPU", nproc=1, dp=1, **dict(common, pp=1, schedule="gpipe"))
        gpus = args.pp * args.dp
        many = s.ours(f"ours pp{args.pp} dp{args.dp}", nproc=gpus, dp=args.dp, **common)
        s.target(
            f"3: pp{args.pp} x dp{args.dp} tok/s / ({gpus} x 1-GPU tok/s)",
            ratio(many.get("tokens_per_s"), one.get("tokens_per_s") and gpus * one["tokens_per_s"]),
            0.85,
            ours=many,
            reference=one,
        )
    s.finish(extra={"shape_name": args.shape, "pp": args.pp, "dp": args.dp, "baseline_layers": fit}, ratio_to=base)


if __name__ == "__main__":
    main()
