"""Issue #27 targets 2 and 3: the new families at the sizes people fine-tune, against transformers on the same card.

  part gemma3: Gemma-3-4B shape (text; 34 layers, 5 sliding : 1 global, 262,208-token vocabulary, tied head), full
      fine-tuning on one GPU, 8 sequences of --seq-length per step, 8-bit AdamW on both sides (an fp32 AdamW state
      would not leave room for activations). Ours: --bf16 (bf16 weights, fp32 master copies) --optimizer 8bit-adam
      --chunked-loss on (the head's logits never exist whole). transformers: fp32 weights, bf16 autocast,
      bitsandbytes' AdamW8bit (what HF Trainer's bf16=True + optim=adamw_bnb_8bit runs), plain and with
      liger-kernel's kernels (its fused linear cross-entropy). Same micro-batch and batch on both sides.
      target 27.2: tokens/s and peak memory, ours against each; the head is not ours' memory peak (chunked loss).
  part qwen32: Qwen2.5-32B shape QLoRA on one 80 GB card: ours --quantize-base nf4 --activation-checkpointing full,
      LoRA r16 on every linear of the blocks, against transformers + peft + bitsandbytes NF4 (double quantisation,
      bf16 compute) with gradient checkpointing, micro-batch 1 x --qwen32-batch per step.
      target 27.3: it runs; peak memory and tokens/s against the reference.

Both models are random (no hub here): ours draws its init on the host (a QLoRA base is quantised from there, linear
by linear), transformers builds on the GPU.

Device (`kind` nvidia-h100-x1; `carry` [".whl-lc"]: bitsandbytes and liger-kernel wheels, peft is the image's):
    python3 bench/bench_families.py --part gemma3               # ~6 min (estimate)
    python3 bench/bench_families.py --part qwen32 --steps 4 --warmup 1   # ~8 min (estimate: 32B init on the host)
    python bench/bench_families.py --smoke                      # CPU: tiny shapes, both parts, the plumbing
"""

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lora import Lora, best, parse_variant, peft_describe, set_ratios  # noqa: E402
from common import Session, add_common_args, apply_smoke, ratio, reference_variants  # noqa: E402


def transformers_describe(s: Session, v: dict) -> dict:
    return {
        "precision": "fp32 weights, bf16 autocast" if s.gpu else "fp32",
        "activation_checkpointing": "full (gradient checkpointing)" if v["gc"] else "none",
        "optimizer": "bitsandbytes AdamW8bit" if s.gpu else "torch AdamW",
    }


def part_gemma3(s: Session, args) -> dict:
    """Gemma-3-4B full fine-tuning, each side's variants at the same batch."""
    model = s.model_dir("gemma3-tiny" if args.smoke else "gemma3-4b")
    batch = 4 if args.smoke else 8
    data = s.data_file(args.steps * batch * args.seq_length)
    optimizer = ["--optimizer", "adamw8bit"] if s.gpu else []
    reference_runs = [
        s.baseline(
            f"gemma3 transformers {v['label']}",
            model_dir=model,
            micro_batch=v["mb"],
            accum=batch // v["mb"],
            extra=optimizer + v["flags"],
            compile=v["compile"] and not args.smoke,
            describe=transformers_describe(s, v),
        )
        for v in reference_variants(args.gemma3_hf, batch)
    ]
    ours_runs = []
    for text in args.gemma3_ours.split(","):
        v = parse_variant(text.strip(), 2)
        ours_runs.append(
            s.ours(
                f"gemma3 ours {v['label']}",
                model_dir=model,
                data=data,
                nproc=1,
                micro_batch=v["mb"],
                batch=batch,
                compile=v["compile"] and not args.smoke,
                activation_checkpointing=v["ac"],
                optimizer="8bit-adam" if s.gpu else "adam",
                extra=["--chunked-loss", "on"],
            )
        )
    reference, top = best(reference_runs), best(ours_runs)
    set_ratios(reference_runs + ours_runs, reference)
    s.target(
        "27.2a: Gemma-3-4B full fine-tune, best ours / transformers' best, tokens/s",
        ratio(top and top["tokens_per_s"], reference and reference.get("tokens_per_s")),
        1.0,
        detail=f"ours: {top and top['label']}, transformers: {reference and reference['label']}",
        ours=top,
        reference=reference,
    )
    s.target(
        "27.2b: Gemma-3-4B full fine-tune, peak memory, best ours / that transformers run",
        ratio(top and top.get("max_mem_gb"), reference and reference.get("max_mem_gb")),
        1.0,
        compare="<=",
        ours=top,
        reference=reference,
    )
    return {"reference": reference_runs, "ours": ours_runs}


def part_qwen32(s: Session, args) -> dict:
    """Qwen2.5-32B QLoRA, micro-batch 1, full recompute on both sides."""
    if importlib.util.find_spec("bitsandbytes") is None and not args.smoke:
        s.note("qwen32: bitsandbytes is not importable here; carry its wheel (bench/README.md)")
        return {"skipped": "bitsandbytes missing"}
    model = s.model_dir("qwen2-tiny" if args.smoke else "qwen2.5-32b")
    batch = 2 if args.smoke else args.qwen32_batch
    data = s.data_file(args.steps * batch * args.seq_length)
    lora = Lora(args, "all-linear")
    fpt = lora.flops(model, args.seq_length)
    quantize = [] if args.smoke else ["--quantize", "nf4"]  # bitsandbytes 4-bit needs a GPU
    v = parse_variant("gc", 1)
    reference = s.baseline(
        "qwen32 peft nf4 gc",
        model_dir=model,
        micro_batch=1,
        accum=batch,
        extra=lora.peft(s.gpu) + quantize + ["--gradient-checkpointing"],
        flops=fpt,
        compile=False,
        describe=peft_describe(s, v, "none" if args.smoke else "nf4"),
    )
    ours = s.ours(
        "qwen32 ours nf4 ac-full",
        model_dir=model,
        data=data,
        nproc=1,
        micro_batch=1,
        batch=batch,
        activation_checkpointing="full",
        extra=lora.ours("none" if args.smoke else "nf4"),
        flops=fpt,
    )
    set_ratios([reference, ours], reference)
    s.target(
        "27.3a: Qwen2.5-32B QLoRA on one card, ours / transformers + peft + bitsandbytes, tokens/s",
        ratio(ours.get("tokens_per_s"), reference.get("tokens_per_s")),
        1.0,
        detail=f"our launch to first step {ours.get('launch_to_first_step_s')}s (host init + quantise)",
        ours=ours,
        reference=reference,
    )
    s.target(
        "27.3b: Qwen2.5-32B QLoRA, peak memory, ours / transformers + peft + bitsandbytes",
        ratio(ours.get("max_mem_gb"), reference.get("max_mem_gb")),
        1.0,
        compare="<=",
        ours=ours,
        reference=reference,
    )
    return {"reference": reference, "ours": ours}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, steps=10, warmup=3)
    ap.add_argument("--part", default="gemma3", help="comma list of gemma3, qwen32, run in this order")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--gemma3-hf", default="mb2+gc,mb2+gc+liger", help="transformers variants (mbN, gc, liger)")
    ap.add_argument("--gemma3-ours", default="mb2,mb2+compile", help="our variants (mbN, compile, ac-*)")
    ap.add_argument("--qwen32-batch", type=int, default=4, help="sequences per step (micro-batch 1 x this)")
    args = ap.parse_args()
    apply_smoke(args, ap)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    if args.smoke and args.part == ap.get_default("part"):
        parts = ["gemma3", "qwen32"]
    if any(p not in ("gemma3", "qwen32") for p in parts):
        sys.exit(f"bench_families: --part {args.part!r}: parts are gemma3 and qwen32")
    if args.smoke:  # one run per side, plain transformers: liger needs a GPU
        args.gemma3_hf, args.gemma3_ours, args.lora_r = "mb2", "mb2", 4
    s = Session("bench_families", args)
    results = {}
    for part in parts:
        results[part] = (part_gemma3 if part == "gemma3" else part_qwen32)(s, args)
    s.finish({"parts": parts, **results})


if __name__ == "__main__":
    main()
