"""Issue 20 item 2: --fp8 (torchao float8 training) against our own bf16, measured in the same call.

Both sides are the real entrypoint under torchrun on one GPU, --bf16 (bf16 weights, fp32 AdamW masters), random
init from the same seed; the float8 side adds --fp8 RECIPE (the blocks' large linears in float8, embedding and head
in bf16, see modules/fp8.py).

  part 1: Pythia-6.9B shape (--p1-shape neox-20b: GPT-NeoX-20B), seq 2048, micro-batch 1 x 4 per step, no
          recompute, --compile on both sides. bf16 vs --fp8 tensorwise (--recipes adds rowwise). The whole 6.9B
          takes 111 GB in bf16 (an H200); on an 80 GB card --p1-layers N trains N of the shape's layers (the
          matmuls keep the shape's sizes, which is what float8 gains on). Targets (issue 31.4): fp8 tokens/s >=
          1.25 x bf16 at 6.9B, >= 1.3 x at 20B. MFU is counted with the bf16 formula and peak for both (the float8
          run does the same model FLOPs; its MFU says how much faster than bf16 it got, not float8 utilisation).
  part 2: numerics, Pythia-410M shape, --p2-steps (300) steps on the bundled data (assets/data/sample_chat.jsonl and
          sample_messages.jsonl), seq 512, 8 sequences per step (micro-batch 4), lr --p2-lr after 30 warmup steps,
          --compile: bf16 vs --fp8 tensorwise, the same seed and batches. Target: |fp8 - bf16| / bf16 <= 1% at every
          logged step (--log-interval 1). --p2-control adds a bf16 run at micro-batch 2 (the same sums grouped
          otherwise): the same comparison between two bf16 runs is the noise floor the fp8 one is read against. At hidden 1024 tensorwise converts query_key_value and dense_h_to_4h
          (48 of 96 block linears; rowwise none, so part 2 runs tensorwise only).

The GPU image has no torchao: carry its wheel and install it first (python 3.12, torch 2.11):
  .whl/torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl   (3.4 MB, `pip download torchao==0.18.0`)

    pip install --no-index --no-deps .whl/*.whl && python3 bench/bench_fp8.py     # both parts, ~8 min (estimate)
    python3 bench/bench_fp8.py --part 1 --recipes tensorwise,rowwise                # ~8 min (estimate)
    # one H100 (80 GB), one call: half of 6.9B's layers, then 6 of 20B's 44 (~60 GB each in bf16, estimated)
    python3 bench/bench_fp8.py --part 1 --recipes tensorwise,rowwise --p1-layers 16 --out $OUT/fp8_6.9b.json \
        --time-budget 280 && python3 bench/bench_fp8.py --part 1 --recipes tensorwise,rowwise --p1-shape neox-20b \
        --p1-layers 6 --out $OUT/fp8_20b.json --time-budget 280
    # the same at micro-batch 4, where float8 gains most (one H100, 2026-12-08: 12 of 6.9B's layers 50 GB, 6 of 20B's
    # 54 GB; about 110 s each)
    python3 bench/bench_fp8.py --part 1 --recipes tensorwise --p1-layers 12 --p1-micro-batch 4 --p1-batch 4
    python3 bench/bench_fp8.py --part 1 --recipes tensorwise --p1-shape neox-20b --p1-layers 6 --p1-micro-batch 4 \
        --p1-batch 4
    python3 bench/bench_fp8.py --smoke      # CPU: plumbing only; float8 needs a GPU, so part 1's fp8 run must be
                                            # refused with the trainer's one line (part 2's is not launched)
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, SHAPES, Session, add_common_args, apply_smoke, ratio, relative_loss_gaps  # noqa: E402

DATA = ",".join(os.path.join(REPO, "assets", "data", name) for name in ("sample_chat.jsonl", "sample_messages.jsonl"))
GPU_REFUSAL = "--fp8 needs an NVIDIA GPU"


def fp8_run(s: Session, label: str, recipe: str, **common) -> dict:
    """One --fp8 run; on CPU (--smoke) the trainer must refuse it with its one line, which is what is checked."""
    run = s.ours(label, extra=common.pop("extra", []) + ["--fp8", recipe], **common)
    run["fp8"] = recipe
    if not s.gpu:
        refused = str(run.get("status")).startswith("exit") and GPU_REFUSAL in (run.get("error_tail") or "")
        run["status"] = "refused on CPU, as expected" if refused else f"{run.get('status')}: expected the GPU refusal"
        s.note(f"{label}: {run['status']}")
    return run


def part1(s: Session, args) -> dict:
    shape = "tiny" if args.smoke else args.p1_shape
    layers = None if args.smoke else args.p1_layers or None
    named = shape if layers is None else f"{shape} ({layers} of {SHAPES[shape]['num_layers']} layers)"
    common = dict(
        model_dir=s.model_dir(shape, layers),
        data=s.data_file(args.steps * args.p1_batch * args.seq_length),
        nproc=1,
        micro_batch=args.p1_micro_batch,
        batch=args.p1_batch,
        compile=not args.p1_eager,
        activation_checkpointing=args.p1_recompute,
    )
    bf16 = s.ours("p1 bf16", **common)
    out = {"shape": shape, "layers": layers or SHAPES[shape]["num_layers"], "bf16": bf16.get("tokens_per_s")}
    for recipe in args.recipes.split(","):
        fp8 = fp8_run(s, f"p1 fp8 {recipe}", recipe, **common)
        speedup = ratio(fp8.get("tokens_per_s"), bf16.get("tokens_per_s"))
        out[recipe] = {"tokens_per_s": fp8.get("tokens_per_s"), "x_bf16": speedup}
        s.target(
            f"31.4: {named} fp8 {recipe} tokens/s / bf16 tokens/s (one GPU{'' if args.p1_eager else ', --compile'})",
            speedup,
            1.3 if shape == "neox-20b" else 1.25,
            detail=f"mb{args.p1_micro_batch} x {args.p1_batch // args.p1_micro_batch}, recompute {args.p1_recompute}",
            ours=fp8,
            reference=bf16,
        )
    return out


def part2(s: Session, args) -> dict:
    shape = "tiny" if args.smoke else "pythia-410m"
    steps = args.p2_steps
    # the throughput part's --steps / --seq-length do not apply here (bench_lora.py part 5 does the same)
    saved = (args.steps, args.warmup, args.seq_length)
    args.steps, args.warmup, args.seq_length = steps, min(args.warmup, steps - 1), args.p2_seq
    try:
        common = dict(
            model_dir=s.model_dir(shape),
            data=DATA,
            nproc=1,
            micro_batch=args.p2_micro_batch,
            batch=args.p2_batch,
            compile=not args.p2_eager,
            extra=["--lr", str(args.p2_lr), "--warmup-steps", "30", "--max-grad-norm", "1.0", "--seed", "42"],
        )
        bf16 = s.ours(f"p2 bf16 {steps} steps", **common)
        control = {}
        if args.p2_control:  # the same bf16 steps, micro-batches summed in another grouping: only rounding differs
            half = max(1, args.p2_micro_batch // 2)
            control = s.ours(f"p2 bf16 mb{half} {steps} steps (control)", **dict(common, micro_batch=half))
        if s.gpu:
            fp8 = fp8_run(s, f"p2 fp8 tensorwise {steps} steps", "tensorwise", **common)
        else:  # part 1 has checked the refusal; one launch less keeps the smoke short
            fp8 = {}
            s.note("p2 fp8: not launched on CPU")
    finally:
        args.steps, args.warmup, args.seq_length = saved
    if args.smoke:  # no float8 run on CPU: check the comparison on the bf16 run against itself
        itself = relative_loss_gaps(bf16, bf16)
        assert len(itself) == steps and max(itself.values()) == 0.0, itself
    curve = s.loss_curve_target(
        f"20.2: {shape} {steps} steps, max |fp8 - bf16| / bf16 loss over the logged steps",
        fp8,
        bf16,
        steps,
        0.01,
        labels=("fp8", "bf16"),
        tag="p2 ",
    )
    out = {"shape": shape, "seq_length": args.p2_seq, "batch_per_step": args.p2_batch, "steps": steps, "curve": curve}
    if control:
        out["control_curve"] = s.loss_curve_target(
            f"20.2 control: {shape} {steps} steps, max |bf16 mb{half} - bf16 mb{args.p2_micro_batch}| / bf16 loss "
            "(bf16's own rounding noise on this data, the floor of the comparison above)",
            control,
            bf16,
            steps,
            0.01,
            labels=(f"bf16 mb{half}", "bf16"),
            tag="p2 control ",
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, steps=10, warmup=3)
    ap.set_defaults(time_budget=540)
    ap.add_argument("--part", default="1,2", help="comma list of 1 (speed) and 2 (loss), run in this order")
    g = ap.add_argument_group("part 1 (Pythia-6.9B or GPT-NeoX-20B shape, one GPU)")
    g.add_argument("--p1-shape", choices=("pythia-6.9b", "neox-20b"), default="pythia-6.9b")
    g.add_argument(
        "--p1-layers", type=int, default=0, help="this many of the shape's layers (0: all), where all do not fit"
    )
    g.add_argument("--recipes", default="tensorwise", help="comma list of tensorwise, rowwise")
    g.add_argument("--p1-batch", type=int, default=4, help="sequences per step")
    g.add_argument("--p1-micro-batch", type=int, default=1)
    g.add_argument("--p1-recompute", choices=("none", "selective", "full"), default="none")
    g.add_argument("--p1-eager", action="store_true", help="without --compile (float8 casts are slow eagerly)")
    g = ap.add_argument_group("part 2 (Pythia-410M shape, loss against bf16)")
    g.add_argument("--p2-steps", type=int, default=300)
    g.add_argument("--p2-seq", type=int, default=512)
    g.add_argument("--p2-batch", type=int, default=8)
    g.add_argument("--p2-micro-batch", type=int, default=4)
    g.add_argument("--p2-lr", type=float, default=1e-4)
    g.add_argument("--p2-eager", action="store_true", help="without --compile")
    g.add_argument(
        "--p2-control",
        action="store_true",
        help="also a bf16 run at half the micro-batch: how far two bf16 runs that differ only in rounding drift apart",
    )
    args = ap.parse_args()
    apply_smoke(args, ap)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    if any(p not in ("1", "2") for p in parts):
        sys.exit(f"bench_fp8: --part {args.part!r}: parts are 1 and 2")
    if not 0 <= args.p1_layers <= SHAPES[args.p1_shape]["num_layers"]:
        sys.exit(f"bench_fp8: --p1-layers {args.p1_layers}: 0 (all) to {SHAPES[args.p1_shape]['num_layers']}")
    if any(r not in ("tensorwise", "rowwise") for r in args.recipes.split(",")):
        sys.exit(f"bench_fp8: --recipes {args.recipes!r}: recipes are tensorwise and rowwise")
    if args.smoke:
        args.p1_batch, args.p1_micro_batch, args.p2_seq, args.p2_batch, args.p2_micro_batch = 2, 1, 64, 2, 1
        args.p1_eager = args.p2_eager = True  # compiling on 2 CPU cores takes minutes
        if args.p2_steps == ap.get_default("p2_steps"):
            args.p2_steps = 4
    elif importlib.util.find_spec("torchao") is None:
        sys.exit("bench_fp8: --fp8 needs torchao: pip install --no-index --no-deps .whl/torchao-*.whl (see --help)")

    s = Session("bench_fp8", args)
    extra = {"parts": parts}
    for part in parts:
        t0 = time.perf_counter()
        s.note(f"== part {part}, {s.remaining():.0f}s of the time budget left")
        extra[f"part{part}"] = {"1": part1, "2": part2}[part](s, args)
        extra[f"part{part}"]["seconds"] = round(time.perf_counter() - t0, 1)
        s.note(f"== part {part} done in {time.perf_counter() - t0:.0f}s")
    if args.smoke:
        fp8_runs = [r for r in s.runs if r.get("fp8")]
        assert all(r["status"] == "refused on CPU, as expected" for r in fp8_runs), [r["status"] for r in fp8_runs]
    s.finish(extra=extra)


if __name__ == "__main__":
    main()
