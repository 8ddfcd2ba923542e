"""Target 2: pipeline parallelism. Pythia-2.8B shape on pp=2 (or Pythia-6.9B on pp=4), seq 2048.

  target 2: per-GPU throughput of the pipeline >= 0.88 (pp=2; 0.85 at pp=4) x our trainer on ONE GPU running one
            stage's worth of layers alone (a model of the same width with layers/pp layers, same micro-batches per
            step). Each GPU of the pipeline handles every token for its share of the layers, so throughput per GPU
            is compared as achieved FLOP/s per GPU (the MFU ratio), not as tokens/s divided by pp.

Runs, in this order (one torchrun launch each):
  baseline    transformers on 1 GPU, the layers/pp-layer model (auto-shrunk if it would not fit; see the JSON's
              model.num_layers), micro-batch x micro-batches per step; the 'x base' column is the ratio of achieved
              FLOP/s per GPU (= MFU ratio), since the pipeline's model is pp times deeper;
  1 GPU       our trainer, the layers/pp-layer model, pp=1 (the target's reference);
  schedules   our trainer, the full model on pp GPUs, one run per --schedules entry (gpipe, 1f1b, interleaved-1f1b
              with --virtual-stages); a schedule that runs out of memory shows as failed, with its error.

    python bench/bench_pipeline.py                                     # 2 GPUs, Pythia-2.8B, 16 micro-batches
    python bench/bench_pipeline.py --shape pythia-6.9b --pp 4          # 4 GPUs, 32 micro-batches
    python bench/bench_pipeline.py --smoke                             # CPU check (2 processes, gloo)
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
    ap.add_argument("--shape", default="pythia-2.8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="model layers (default: the shape's)")
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages = GPUs")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=None, help="per step (default: 8 x pp)")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b")
    ap.add_argument("--virtual-stages", type=int, default=2, help="for interleaved-1f1b")
    ap.add_argument("--compile", action="store_true", help="--compile in every run of ours")
    ap.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--no-reference", action="store_true", help="skip the 1-GPU stage-alone run")
    args = ap.parse_args()
    apply_smoke(args, ap)
    if args.smoke:
        args.shape = "tiny"
    layers = args.layers or SHAPES[args.shape]["num_layers"]
    n_micro = args.micro_batches or (4 if args.smoke else 8) * args.pp
    batch = n_micro * args.micro_batch_size
    stage_layers = -(-layers // args.pp)  # one stage's share (the trainer may move a layer off the last stage)

    s = Session("bench_pipeline", args)
    full = s.model_dir(args.shape, layers)
    stage = s.model_dir(args.shape, stage_layers)
    data = s.data_file(args.steps * batch * args.seq_length)
    common = dict(
        data=data,
        micro_batch=args.micro_batch_size,
        batch=batch,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
    )

    fit = baseline_layers_that_fit(
        args.shape, stage_layers, args.micro_batch_size, args.seq_length, s.env["gpu_memory_gb"]
    )
    base = s.baseline(
        f"baseline 1 GPU L{fit}",
        model_dir=s.model_dir(args.shape, fit),
        micro_batch=args.micro_batch_size,
        accum=n_micro,
    )
    ref = None
    if not args.no_reference:
        ref = s.ours(f"ours 1 GPU L{stage_layers}", model_dir=stage, nproc=1, **common)
    for schedule in [x.strip() for x in args.schedules.split(",") if x.strip()]:
        extra = ["--virtual-stages", str(args.virtual_stages)] if schedule == "interleaved-1f1b" else []
        run = s.ours(
            f"pp{args.pp} {schedule}",
            model_dir=full,
            nproc=args.pp,
            pp=args.pp,
            schedule=schedule,
            extra=extra,
            **common,
        )
        # Every GPU of a pipeline handles every token for its 1/pp of the layers, so the fair per-GPU measure is
        # achieved FLOP/s per GPU (MFU), not tokens/s divided by pp.
        s.target(
            f"2: pp{args.pp} {schedule} per-GPU FLOP/s (MFU) / 1-GPU L{stage_layers}",
            ratio(run.get("mfu"), ref and ref.get("mfu")),
            0.88 if args.pp <= 2 else 0.85,
            ours=run,
            reference=ref,
        )
    s.finish(
        extra={
            "shape_name": args.shape,
            "layers": layers,
            "stage_layers": stage_layers,
            "pp": args.pp,
            "micro_batches": n_micro,
            "baseline_layers": fit,
        },
        ratio_to=base,
    )


if __name__ == "__main__":
    main()
