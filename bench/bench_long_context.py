"""Issue #29 target 1: the longest sequence one GPU trains, Llama-3.1-8B shape, LoRA r16 on every linear layer of the
blocks (all-linear), a QLoRA (NF4) base (part qlora) or a bf16 base (part lora), one sequence per step, full causal
attention over the window (random tokens for transformers, packed OIG text under --attention-mask causal for ours).

  ours: the real entrypoint under torchrun, --activation-checkpointing full --activation-offload cpu --chunked-loss
        on --attention-mask causal (the long-context recipe's settings), lengths from --ours-lengths, with
        --tiled-mlp off, on, or each;
  reference: bench/baseline_hf.py, transformers + peft (+ bitsandbytes) with gradient checkpointing, with and
        without liger-kernel's kernels (its fused linear cross-entropy), lengths from --hf-lengths.
Each side runs its lengths in increasing order and stops at the first that fails (out of memory, or the time
budget): the longest that finished its steps is that side's length. tokens/s at --speed-length (32k) is read from
the runs at that length.

  target 29.1a: ours' longest QLoRA length >= 4 x the reference's longest, and >= 131072 tokens;
  target 29.1b: ours' tokens/s at 32k >= the reference's best at 32k (with or without liger).

A step at 128k tokens of an 8B model is about two minutes on one H100 (forward, recomputation and backward), so each
length is --steps 2 (the first untimed) and the lengths of one part take several calls: pass a few per call.

Device (`kind` nvidia-h100-x1, `carry` [".whl"] with the bitsandbytes, peft and liger-kernel wheels the image lacks):
    python3 bench/bench_long_context.py --part qlora --hf-lengths 8192,16384,32768,65536 --ours-lengths 32768
    python3 bench/bench_long_context.py --part qlora --no-baseline --ours-lengths 65536,131072
    python3 bench/bench_long_context.py --part qlora --ours-lengths '' --reference liger --hf-lengths 16384,32768
    python bench/bench_long_context.py --smoke        # CPU: tiny Llama, short lengths, both sides, the plumbing
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Session, add_common_args, apply_smoke, ratio  # noqa: E402

OURS_FLAGS = ["--activation-offload", "cpu", "--chunked-loss", "on"]  # and --activation-checkpointing full
OURS_FLAGS += ["--attention-mask", "causal", "--lora-r", "16", "--lora-alpha", "32"]
OURS_FLAGS += ["--lora-target-modules", "all-linear"]
HF_FLAGS = ["--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear", "--base-dtype", "bf16"]
HF_FLAGS += ["--gradient-checkpointing"]


def lengths_of(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(",") if x.strip())


def probe(s: Session, label: str, lengths: list[int], run_one) -> list[dict]:
    """Runs at increasing lengths until one fails; the runs, in order."""
    runs = []
    for length in lengths:
        s.args.seq_length = length
        run = run_one(length)
        run["seq_length"] = length
        runs.append(run)
        if run.get("status") != "ok" or run.get("error"):
            s.note(f"{label}: stops at {length} ({run.get('error') or run.get('status')})")
            break
    return runs


def longest(runs: list[dict]) -> int | None:
    done = [r["seq_length"] for r in runs if r.get("status") == "ok" and not r.get("error") and r.get("tokens_per_s")]
    return max(done, default=None)


def at_length(runs: list[dict], length: int) -> dict | None:
    return next((r for r in runs if r["seq_length"] == length and r.get("tokens_per_s")), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, steps=2, warmup=1)
    ap.add_argument("--part", default="qlora", choices=["qlora", "lora"])
    ap.add_argument("--ours-lengths", default="32768,65536,131072")
    ap.add_argument("--hf-lengths", default="8192,16384,32768")
    ap.add_argument("--speed-length", type=int, default=32768)
    ap.add_argument("--ours-extra", default="", help="more trainer flags for ours, one string (e.g. --profiling ...)")
    ap.add_argument("--tiled-mlp", default="off", choices=["off", "on", "both"], help="ours' --tiled-mlp (both: each)")
    ap.add_argument(
        "--reference",
        default="both",
        choices=["both", "plain", "liger"],
        help="the reference's runs: without liger-kernel, with it, or both (each probes --hf-lengths)",
    )
    args = ap.parse_args()
    apply_smoke(args, ap)
    shape = "llama3-8b"
    if args.smoke:
        shape, args.ours_lengths, args.hf_lengths, args.speed_length = "llama-tiny", "64,128", "64,128", 128
        args.reference = "plain"  # liger's kernels are Triton: GPUs only
    quantize = args.part == "qlora"
    s = Session("bench_long_context", args)
    model = s.model_dir(shape)
    ours_lengths = lengths_of(args.ours_lengths)  # none: a call for the reference alone
    data = s.data_file(max(ours_lengths) * (args.steps + 2)) if ours_lengths else None
    ours_extra = OURS_FLAGS + (["--quantize-base", "nf4"] if quantize else []) + shlex.split(args.ours_extra)
    hf_extra = HF_FLAGS + (["--quantize", "nf4"] if quantize and s.gpu else [])

    def ours(tiled: str):
        def run(length: int) -> dict:
            label = f"ours {args.part}{' tiled' if tiled == 'on' else ''} {length}"
            return s.ours(label, model_dir=model, data=data, nproc=1, micro_batch=1, batch=1,
                          activation_checkpointing="full", extra=ours_extra + ["--tiled-mlp", tiled])  # fmt: skip

        return run

    def reference(liger: bool):
        def run(length: int) -> dict:
            label = f"hf {args.part}{' + liger' if liger else ''} {length}"
            return s.baseline(label, model_dir=model, micro_batch=1, accum=1,
                              extra=hf_extra + (["--liger"] if liger else []))  # fmt: skip

        return run

    mine = []
    for tiled in ("off", "on") if args.tiled_mlp == "both" else (args.tiled_mlp,):
        mine += probe(s, f"ours tiled-mlp={tiled}", ours_lengths, ours(tiled))
    theirs = {}
    if not args.no_baseline:
        for liger in {"plain": (False,), "liger": (True,), "both": (False, True)}[args.reference]:
            theirs[liger] = probe(s, f"hf liger={liger}", lengths_of(args.hf_lengths), reference(liger))
    best_hf = max((longest(runs) or 0 for runs in theirs.values()), default=0) or None
    s.target(
        f"29.1a: Llama-3.1-8B {args.part}, ours' longest sequence / the reference's longest",
        ratio(longest(mine), best_hf),
        4.0,
        detail=f"ours {longest(mine)} tokens (tried {args.ours_lengths}); reference {best_hf} (tried {args.hf_lengths})",
    )
    speed_ours = at_length(mine, args.speed_length)
    speed_hf = [r for r in (at_length(runs, args.speed_length) for runs in theirs.values()) if r]
    speed_ref = max(speed_hf, key=lambda r: r["tokens_per_s"], default=None)
    s.target(
        f"29.1b: Llama-3.1-8B {args.part} at {args.speed_length} tokens, ours / the reference's best, tokens/s",
        ratio(speed_ours and speed_ours["tokens_per_s"], speed_ref and speed_ref["tokens_per_s"]),
        1.0,
        ours=speed_ours,
        reference=speed_ref,
    )
    s.finish(extra={"part": args.part, "shape": shape, "ours_longest": longest(mine), "reference_longest": best_hf})


if __name__ == "__main__":
    main()
