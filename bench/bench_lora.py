"""Issue 14's targets: LoRA / QLoRA in our trainer against transformers + peft, measured in the same call.

Reference (issue 14): transformers GPTNeoXForCausalLM + peft LoraConfig (dropout 0), bf16 base, fp32 adapters, bf16
autocast, SDPA, fused AdamW on the adapters only (bench/baseline_hf.py --lora-r ...). Ours: the real entrypoint
under torchrun, --bf16, --lora-r/--lora-alpha/--lora-target-modules, random init from --seed (no weights read)
unless said otherwise. All runs: r=16, alpha 32, seq 2048, 20 steps of which the first 5 are not timed.

  part 1: Pythia-1.4B shape, all linear layers, 8 sequences per step. peft eager (mb4 x 2) and peft + torch.compile
          vs ours (default mb4, mb8+compile). Targets: best ours >= 1.3 x peft eager, >= 1.1 x peft compiled.
  part 2: GPT-NeoX-20B shape on one GPU, query_key_value, micro-batch 1 x 4 per step. peft eager with and without
          gradient checkpointing and + torch.compile (issue #31.6: its best, eager or compiled) vs ours (default
          ac-none+compile). Targets: best ours >= 1.15 x peft's best, its peak allocated <= 60 GB; with
          --load-from-disk also launch -> first step <= 90 s reading bf16 safetensors. If one call cannot hold every
          run, split it as part 6 is split (`--p2-ours ''`, then `--p2-peft ''`) and divide by hand. Micro-batch 2
          (x 2 per step) is the sweep's next point on both sides (`--p2-peft mb1+compile,mb2+compile --p2-ours
          ac-none+compile+causal,mb2+ac-none+compile+causal`; at micro-batch 1 ours peaked at 49.3 GB, peft at 53.1
          GB on an H100, 2026-12-07); peft's compile takes ~115 s before its first step.
  part 3: the same 20B, QLoRA: ours --quantize-base nf4 --activation-checkpointing full vs transformers + peft +
          bitsandbytes 4-bit (NF4, double quant, bf16 compute) with gradient checkpointing, micro-batch 1 x 4.
          Targets: our peak allocated <= 24 GB, our tokens/s >= peft's. Our trainer quantises a stage after building
          it on the host, so a random 20B base is drawn on the CPU first (see the run's launch_to_first_step_s);
          --p3-layers N runs both sides with N of the 44 layers (say so when reporting: it is in the labels).
  part 6: Qwen3-8B shape (issue 27), all linear layers, 8 sequences per step: peft eager and + torch.compile at
          their micro-batches vs ours. Targets: best ours >= 1.4 x peft's best eager, >= 1.15 x peft's best compiled,
          at no more peak memory than peft.
  part 5: loss curves, Pythia-410M shape, --p5-steps (200) steps on assets/data/sample_chat.jsonl, r=16 on
          query_key_value: one random bf16 base written once as safetensors and loaded by both sides, the same
          initial adapters (peft starts from our seeded init, modules.init_lora_weights), the same batches
          (tasks.PackedStream, same seed), the same optimizer step (AdamW 0.9/0.999, eps 1e-6, wd 0.01, clip 1.0,
          linear decay). Target: |ours - peft| / peft <= 2% at every step.

Variants (comma lists, words joined by '+'): mbN micro-batch, compile (ours: --compile; peft: torch.compile of the
whole model), ac-none / ac-selective / ac-full (ours), gc (peft gradient checkpointing), all (all-linear targets
instead of the part's default; issue 14 asks for the 20B all-linear figure too).

LoRA MFU = tokens/s x (4·N_base + 6·N_lora + 12·L·d·S) / peak (modules.lora_flops_per_token; recompute not counted).
Memory = torch.cuda.max_memory_allocated over the steps (peft: counted from after the model is built / quantised).

    python bench/bench_lora.py --part 1,2            # one H200 call, ~8-9 min (estimate; bench/README.md)
    python bench/bench_lora.py --part 5,3            # the next call; part 3 needs the bitsandbytes wheel
    python bench/bench_lora.py --part 6 --p6-ours ''  # Qwen3-8B: peft's side (its compile alone takes ~4 min)
    python bench/bench_lora.py --part 6 --p6-peft ''  # the next call on the same machine: ours
    python bench/bench_lora.py --smoke               # CPU check, tiny shapes, every part
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, Session, add_common_args, apply_smoke, lora_flops_per_token, ratio  # noqa: E402

CHAT_DATA = os.path.join(REPO, "assets", "data", "sample_chat.jsonl")
SEED = 42


def trainer_has_attention_mask() -> bool:
    """Whether the trainer takes --attention-mask (document | causal); older trees have causal attention only."""
    for where in (("config", "sections.py"), ("utils", "args.py")):  # where the flags are defined, now and before
        path = os.path.join(REPO, *where)
        if os.path.isfile(path):
            with open(path) as f:
                if '"--attention-mask"' in f.read():
                    return True
    return False


def parse_variant(text: str, default_mb: int) -> dict:
    v = {"label": text, "mb": default_mb, "compile": False, "ac": "none", "gc": False, "all": False, "mask": None}
    for word in text.split("+"):
        if word.startswith("mb") and word[2:].isdigit():
            v["mb"] = int(word[2:])
        elif word == "compile":
            v["compile"] = True
        elif word.startswith("ac-") and word[3:] in ("none", "full", "selective"):
            v["ac"] = word[3:]
        elif word == "gc":
            v["gc"] = True
        elif word == "all":
            v["all"] = True
        elif word in ("causal", "document"):
            v["mask"] = word
        elif word in ("eager", "bf16", "peft", "nogc"):
            pass
        else:
            sys.exit(
                f"bench_lora: unknown variant word {word!r} in {text!r} (mbN, compile, ac-*, gc, all, causal, document)"
            )
    return v


def variants(text: str, default_mb: int, smoke: bool, batch: int) -> list[dict]:
    out = [parse_variant(t.strip(), default_mb) for t in text.split(",") if t.strip()]
    for v in out:
        if smoke:  # torch.compile on 2 CPU cores takes minutes: the smoke run checks the plumbing without it
            v["compile"] = False
        if batch % v["mb"]:
            sys.exit(f"bench_lora: variant {v['label']!r}: micro-batch {v['mb']} does not divide the batch {batch}")
    return out


class Lora:
    """The part's LoRA settings and the flags that give them to each side."""

    def __init__(self, args, targets: str):
        self.r, self.alpha, self.targets = args.lora_r, args.lora_alpha, targets

    def ours(self, quantize: str = "none", mask: str | None = None) -> list[str]:
        flags = ["--lora-r", str(self.r), "--lora-alpha", str(self.alpha), "--lora-target-modules", self.targets]
        if mask:
            if not trainer_has_attention_mask():
                sys.exit(f"bench_lora: the trainer here has no --attention-mask (variant word {mask!r})")
            flags += ["--attention-mask", mask]
        return flags + (["--quantize-base", quantize] if quantize != "none" else []) + ["--seed", str(SEED)]

    def peft(self, gpu: bool) -> list[str]:
        flags = ["--lora-r", str(self.r), "--lora-alpha", str(self.alpha), "--lora-targets", self.targets]
        return flags + (["--base-dtype", "bf16"] if gpu else [])

    def flops(self, model_dir: str, seq: int) -> float:
        return lora_flops_per_token(model_dir, seq, self.r, self.alpha, self.targets)


def peft_describe(s: Session, v: dict, quantize: str = "none") -> dict:
    base = "nf4" if quantize != "none" else ("bf16" if s.gpu else "fp32")
    return {
        "kind": "peft",
        "precision": f"{base} base, fp32 adapters" + (", bf16 autocast" if s.gpu else ""),
        "activation_checkpointing": "full (gradient checkpointing)" if v["gc"] else "none",
        "optimizer": "torch AdamW fused (adapters)" if s.gpu else "torch AdamW (adapters)",
    }


def set_ratios(runs: list[dict], ref: dict | None) -> None:
    for run in runs:
        if run is not ref:
            run["ratio_to_baseline"] = ratio(run.get("tokens_per_s"), ref and ref.get("tokens_per_s"))
            run["reference"] = ref and ref["label"]


def best(runs: list[dict]) -> dict | None:
    return max((r for r in runs if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"], default=None)


def write_weights(s: Session, shape: str, layers: int, name: str) -> tuple[str, dict]:
    """A random-init bf16 safetensors model of `shape` (bench_big's writer, tensors drawn on the GPU) in a child
    process, so this one never holds a CUDA context; reused when complete."""
    path = os.path.join(s.workdir, name)
    if os.path.exists(os.path.join(path, "WRITTEN_BY_BENCH")):
        return path, {"reused": path}
    cmd = [sys.executable, os.path.abspath(__file__), "--write-model", path, "--write-shape", shape]
    cmd += ["--write-layers", str(layers), "--seq-length", str(s.args.seq_length)]
    cmd += ["--write-device", "cuda" if s.gpu else "cpu"]
    t0 = time.perf_counter()
    if not s.gpu:  # --smoke: tiny, on the CPU, in this process (no CUDA context to keep out of it)
        from bench_big import write_random_gptneox
        from common import hf_config

        config = hf_config(shape, layers or None, max_positions=s.args.seq_length)
        return path, write_random_gptneox(path, config, "cpu", seed=SEED)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_lora: writing {shape} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    written = json.loads(done.stdout.strip().splitlines()[-1])
    written["process_seconds"] = round(time.perf_counter() - t0, 1)
    s.note(f"model: wrote {written['gb']} GB bf16 in {written['files']} files in {written['seconds']}s to {path}")
    return path, written


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------


def all_linear_runs(s: Session, args, part: str, shape: str, peft_variants: str, ours_variants: str, mb: int):
    """Parts 1 and 6: each side's variants, all-linear adapters, 8 sequences per step (4 in --smoke); the runs of
    each side and the LoRA FLOPs per token."""
    model = s.model_dir(shape)
    lora = Lora(args, "all-linear")
    fpt = lora.flops(model, args.seq_length)
    batch = 4 if args.smoke else 8
    data = s.data_file(args.steps * batch * args.seq_length)
    peft_runs = [
        s.baseline(
            f"{part} peft {v['label']}",
            model_dir=model,
            micro_batch=v["mb"],
            accum=batch // v["mb"],
            extra=lora.peft(s.gpu) + (["--gradient-checkpointing"] if v["gc"] else []),
            flops=fpt,
            compile=v["compile"],
            describe=peft_describe(s, v),
        )
        for v in variants(peft_variants, mb, args.smoke, batch)
    ]
    ours_runs = [
        s.ours(
            f"{part} ours {v['label']}",
            model_dir=model,
            data=data,
            nproc=1,
            micro_batch=v["mb"],
            batch=batch,
            compile=v["compile"],
            activation_checkpointing=v["ac"],
            extra=lora.ours(mask=v["mask"]),
            flops=fpt,
        )
        for v in variants(ours_variants, mb, args.smoke, batch)
    ]
    return peft_runs, ours_runs, fpt


def part1(s: Session, args) -> dict:
    shape = "tiny" if args.smoke else "pythia-1.4b"
    peft_runs, ours_runs, fpt = all_linear_runs(s, args, "p1", shape, args.p1_peft, args.p1_ours, 4)
    eager = next((r for r in peft_runs if not r["compile"]), None)
    compiled = next((r for r in peft_runs if r["compile"]), None)
    top = best(ours_runs)
    set_ratios(peft_runs + ours_runs, eager)
    shown = f"best: {top['label']}" if top else "no run of ours finished"
    s.target(
        "14.1a: Pythia-1.4B LoRA all-linear, best ours / peft eager",
        ratio(top and top["tokens_per_s"], eager and eager.get("tokens_per_s")),
        1.3,
        detail=shown,
        ours=top,
        reference=eager,
    )
    s.target(
        "14.1b: Pythia-1.4B LoRA all-linear, best ours / peft + torch.compile",
        ratio(top and top["tokens_per_s"], compiled and compiled.get("tokens_per_s")),
        1.1,
        detail=shown if compiled else "peft + compile not in --p1-peft (or compile dropped by --smoke)",
        ours=top,
        reference=compiled,
    )
    return {"shape": shape, "batch_per_step": 4 if args.smoke else 8, "lora_flops_per_token": fpt}


def modules_layers(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def big_model(s: Session, args, layers: int, info: dict) -> tuple[str, str | None]:
    """(config-only dir, weights dir or None) of the 20B shape with `layers` layers."""
    shape = "tiny" if args.smoke else "neox-20b"
    model = s.model_dir(shape, layers or None)
    weights = None
    if args.load_from_disk:
        weights, written = write_weights(s, shape, layers, f"{shape}-L{layers or 'all'}-hf-bf16")
        info["model_written"] = written
    return model, weights


def part2(s: Session, args) -> dict:
    info: dict = {}
    model, weights = big_model(s, args, args.layers, info)
    batch = args.p2_batch
    data = s.data_file(args.steps * batch * args.seq_length)
    peft_runs, ours_runs = [], []
    for v in variants(args.p2_peft, 1, args.smoke, batch):
        lora = Lora(args, "all-linear" if v["all"] else "query_key_value")
        peft_runs.append(
            s.baseline(
                f"p2 peft {v['label']}",
                model_dir=model,
                micro_batch=v["mb"],
                accum=batch // v["mb"],
                extra=lora.peft(s.gpu) + (["--gradient-checkpointing"] if v["gc"] else []),
                flops=lora.flops(model, args.seq_length),
                compile=v["compile"],
                describe={**peft_describe(s, v), "targets": lora.targets},
            )
        )
    for v in variants(args.p2_ours, 1, args.smoke, batch):
        lora = Lora(args, "all-linear" if v["all"] else "query_key_value")
        run = s.ours(
            f"p2 ours {v['label']}" + (" from disk" if weights else ""),
            model_dir=weights or model,
            data=data,
            nproc=1,
            micro_batch=v["mb"],
            batch=batch,
            compile=v["compile"],
            activation_checkpointing=v["ac"],
            load_pretrained=weights is not None,
            extra=lora.ours(mask=v["mask"]),
            flops=lora.flops(model, args.seq_length),
        )
        run["targets"] = lora.targets
        ours_runs.append(run)
    qkv_peft = best([r for r in peft_runs if r.get("targets") == "query_key_value"])
    qkv_ours = best([r for r in ours_runs if r.get("targets") == "query_key_value"])
    set_ratios(peft_runs + ours_runs, qkv_peft)
    for run in peft_runs + ours_runs:  # all-linear runs against peft's best all-linear run
        if run.get("targets") == "all-linear":
            ref = best([r for r in peft_runs if r.get("targets") == "all-linear"])
            run["ratio_to_baseline"] = ratio(run.get("tokens_per_s"), ref and ref.get("tokens_per_s"))
            run["reference"] = ref and ref["label"]
    layers = f"{modules_layers(model)} layers"
    s.target(
        f"14.2a / 31.6: 20B ({layers}) LoRA query_key_value, best ours / peft's best (any micro-batch, eager or compiled)",
        ratio(qkv_ours and qkv_ours["tokens_per_s"], qkv_peft and qkv_peft.get("tokens_per_s")),
        1.15,
        detail=(f"ours: {qkv_ours['label']}" if qkv_ours else "no run of ours finished")
        + (f"; peft's best: {qkv_peft['label']}" if qkv_peft else ""),
        ours=qkv_ours,
        reference=qkv_peft,
    )
    s.target(
        f"14.2b: 20B ({layers}) LoRA, peak allocated of that run of ours, GB",
        qkv_ours and qkv_ours.get("max_mem_gb"),
        60,
        compare="<=",
        ours=qkv_ours,
    )
    if weights:
        s.target(
            "14.2c: 20B launch to first step reading bf16 safetensors, s",
            qkv_ours and qkv_ours.get("launch_to_first_step_s"),
            90,
            compare="<=",
            detail="page cache warm (model just written)"
            + (
                f"; trainer's own figure {qkv_ours.get('trainer_launch_to_first_step_s')}s"
                if qkv_ours and qkv_ours.get("trainer_launch_to_first_step_s")
                else ""
            ),
            ours=qkv_ours,
        )
    return {"layers": args.layers or 44, "batch_per_step": batch, "weights_from_disk": bool(weights), **info}


def part3(s: Session, args) -> dict:
    layers = f"{args.p3_layers} layers" if args.p3_layers else "all layers"
    if importlib.util.find_spec("bitsandbytes") is None:
        s.note("part 3: bitsandbytes is not importable here; install the wheel first (bench/README.md)")
        s.target(f"14.3a: 20B ({layers}) QLoRA nf4 peak allocated, GB", None, 24, compare="<=", detail="no bnb")
        s.target(f"14.3b: 20B ({layers}) QLoRA nf4, ours / peft + bitsandbytes", None, 1.0, detail="no bitsandbytes")
        return {"skipped": "bitsandbytes missing"}
    info: dict = {}
    model, weights = big_model(s, args, args.p3_layers, info)
    n_layers = modules_layers(model)
    layers = f"{n_layers} layers"
    batch = args.p2_batch
    data = s.data_file(args.steps * batch * args.seq_length)
    lora = Lora(args, "query_key_value")
    fpt = lora.flops(model, args.seq_length)
    v = parse_variant("gc", 1)
    peft_run = s.baseline(
        f"p3 peft nf4 gc L{n_layers}",
        model_dir=weights or model,
        micro_batch=1,
        accum=batch,
        extra=lora.peft(s.gpu)
        + ["--quantize", "nf4", "--gradient-checkpointing", "--base-dtype", "bf16"]
        + (["--load-weights"] if weights else []),
        flops=fpt,
        compile=False,
        describe=peft_describe(s, v, "nf4"),
    )
    ours_run = s.ours(
        f"p3 ours nf4 ac-full L{n_layers}" + (" from disk" if weights else ""),
        model_dir=weights or model,
        data=data,
        nproc=1,
        micro_batch=1,
        batch=batch,
        compile=args.p3_compile and not args.smoke,
        activation_checkpointing="full",
        load_pretrained=weights is not None,
        extra=lora.ours("nf4"),
        flops=fpt,
    )
    ours_run["precision"] = "nf4 base, " + ours_run["precision"]
    set_ratios([peft_run, ours_run], peft_run)
    s.target(
        f"14.3a: 20B ({layers}) QLoRA nf4 ac-full mb1, our peak allocated, GB",
        ours_run.get("max_mem_gb"),
        24,
        compare="<=",
        detail=f"peft + bitsandbytes: {peft_run.get('max_mem_gb')} GB",
        ours=ours_run,
        reference=peft_run,
    )
    s.target(
        f"14.3b: 20B ({layers}) QLoRA nf4, ours / transformers + peft + bitsandbytes 4-bit",
        ratio(ours_run.get("tokens_per_s"), peft_run.get("tokens_per_s")),
        1.0,
        detail=f"our launch to first step {ours_run.get('launch_to_first_step_s')}s (host init + quantise)",
        ours=ours_run,
        reference=peft_run,
    )
    return {"layers": args.p3_layers or 44, "batch_per_step": batch, "weights_from_disk": bool(weights), **info}


def part5(s: Session, args) -> dict:
    shape = "tiny" if args.smoke else "pythia-410m"
    seq, batch, mb = args.p5_seq, args.p5_batch, args.p5_micro_batch
    steps = args.p5_steps
    weights, written = write_weights(s, shape, 0, f"{shape}-hf-bf16")
    lora = Lora(args, "query_key_value")
    fpt = lora.flops(weights, seq)
    # the throughput parts' --steps / --seq-length do not apply here: both sides get the part's own
    saved = (args.steps, args.warmup, args.seq_length)
    args.steps, args.warmup, args.seq_length = steps, min(args.warmup, steps - 1), seq
    try:
        optim = ["--lr", str(args.p5_lr), "--max-grad-norm", "1.0"]
        peft_run = s.baseline(
            f"p5 peft {steps} steps",
            model_dir=weights,
            micro_batch=mb,
            accum=batch // mb,
            extra=lora.peft(s.gpu)
            + ["--load-weights", "--init-adapters-seed", str(SEED), "--data", CHAT_DATA, "--data-seed", str(SEED)]
            + optim
            + ["--linear-schedule"],
            flops=fpt,
            compile=False,
            describe=peft_describe(s, parse_variant("eager", mb)),
        )
        ours_run = s.ours(
            f"p5 ours {steps} steps",
            model_dir=weights,
            data=CHAT_DATA,
            nproc=1,
            micro_batch=mb,
            batch=batch,
            load_pretrained=True,
            # transformers attends across the packed documents of a window: ours must too for the same maths
            extra=lora.ours(mask="causal" if trainer_has_attention_mask() else None)
            + optim
            + ["--lr-scheduler", "linear"],
            flops=fpt,
        )
    finally:
        args.steps, args.warmup, args.seq_length = saved
    curve = s.loss_curve_target(
        "14.5: Pythia-410M LoRA loss curve, max |ours - peft| / peft over the logged steps",
        ours_run,
        peft_run,
        steps,
        0.02,
        labels=("ours", "peft"),
        tag="p5 ",
    )
    return {"shape": shape, "seq_length": seq, "batch_per_step": batch, "steps": steps, "curve": curve}


def part6(s: Session, args) -> dict:
    """Qwen3-8B shape, LoRA all-linear: each side at the micro-batches given, the best of each kind compared."""
    shape = "qwen3-tiny" if args.smoke else "qwen3-8b"
    peft_runs, ours_runs, _ = all_linear_runs(s, args, "p6", shape, args.p6_peft, args.p6_ours, 2)
    eager = best([r for r in peft_runs if not r["compile"]])
    compiled = best([r for r in peft_runs if r["compile"]])
    top = best(ours_runs)
    set_ratios(peft_runs + ours_runs, eager)
    shown = f"best: {top['label']}" if top else "no run of ours finished"
    s.target(
        "27.1a: Qwen3-8B LoRA all-linear, best ours / peft's best eager",
        ratio(top and top["tokens_per_s"], eager and eager.get("tokens_per_s")),
        1.4,
        detail=shown,
        ours=top,
        reference=eager,
    )
    s.target(
        "27.1b: Qwen3-8B LoRA all-linear, best ours / peft's best + torch.compile",
        ratio(top and top["tokens_per_s"], compiled and compiled.get("tokens_per_s")),
        1.15,
        detail=shown,
        ours=top,
        reference=compiled,
    )
    return {"peft": peft_runs, "ours": ours_runs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--part", default="1,2", help="comma list of 1, 2, 3, 5, run in this order")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    g = ap.add_argument_group("part 1 (Pythia-1.4B, all-linear)")
    g.add_argument("--p1-peft", default="mb4,mb4+compile")
    g.add_argument("--p1-ours", default="mb4,mb8+compile")
    g = ap.add_argument_group("parts 2 and 3 (GPT-NeoX-20B shape, one GPU)")
    g.add_argument("--p2-peft", default="mb1,mb1+gc,mb1+compile", help="add mb1+all for the all-linear figure")
    g.add_argument("--p2-ours", default="ac-none+compile", help="e.g. ac-none+compile,ac-selective,ac-none+all")
    g.add_argument("--p2-batch", type=int, default=4, help="sequences per step (micro-batch 1 x this)")
    g.add_argument("--layers", type=int, default=0, help="part 2 with this many of the 44 layers (0: all)")
    g.add_argument("--p3-layers", type=int, default=0, help="part 3 with this many of the 44 layers (0: all)")
    g.add_argument("--p3-compile", action="store_true", help="part 3: ours with --compile")
    g.add_argument(
        "--load-from-disk",
        action="store_true",
        help="write the 20B as bf16 safetensors (41 GB) first; ours loads it (launch -> first step target), "
        "peft's QLoRA loads it through from_pretrained(quantization_config=...)",
    )
    g = ap.add_argument_group("part 6 (Qwen3-8B shape, all-linear)")
    g.add_argument("--p6-peft", default="mb1,mb2,mb2+compile")
    g.add_argument("--p6-ours", default="mb2,mb2+compile")
    g = ap.add_argument_group("part 5 (loss curves, Pythia-410M, bundled chat data)")
    g.add_argument("--p5-steps", type=int, default=200)
    g.add_argument("--p5-seq", type=int, default=512)
    g.add_argument("--p5-batch", type=int, default=8)
    g.add_argument("--p5-micro-batch", type=int, default=4)
    g.add_argument("--p5-lr", type=float, default=5e-4)
    ap.add_argument("--write-model", metavar="DIR", help=argparse.SUPPRESS)  # internal: write DIR and exit
    ap.add_argument("--write-shape", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--write-layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--write-device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_model:
        from bench_big import write_random_gptneox
        from common import hf_config

        config = hf_config(args.write_shape, args.write_layers or None, max_positions=args.seq_length)
        print(json.dumps(write_random_gptneox(args.write_model, config, args.write_device, seed=SEED)))
        return
    apply_smoke(args, ap)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    if args.smoke:
        if args.part == ap.get_default("part"):
            parts = ["1", "2", "3", "5"]
        args.lora_r, args.p2_batch = min(args.lora_r, 4), min(args.p2_batch, 2)
        smoke_variants = (("p1_peft", "mb2"), ("p1_ours", "mb2"), ("p2_peft", "mb1+gc"), ("p2_ours", "ac-selective"))
        for name, value in (*smoke_variants, ("p6_peft", "mb2"), ("p6_ours", "mb2")):
            if getattr(args, name) == ap.get_default(name):  # one run per side: the smoke run stays near 2 minutes
                setattr(args, name, value)
        args.p5_seq, args.p5_batch, args.p5_micro_batch = 64, 4, 2
        if args.p5_steps == ap.get_default("p5_steps"):
            args.p5_steps = 6
    if any(p not in ("1", "2", "3", "5", "6") for p in parts):
        sys.exit(f"bench_lora: --part {args.part!r}: parts are 1, 2, 3, 5 and 6 (4 needs several GPUs)")
    if importlib.util.find_spec("peft") is None:
        sys.exit("bench_lora: the reference needs peft (pip install peft, or carry its wheel)")

    s = Session("bench_lora", args)
    extra = {"parts": parts, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha}
    for part in parts:
        t0 = time.perf_counter()
        s.note(f"== part {part}, {s.remaining():.0f}s of the time budget left")
        extra[f"part{part}"] = {"1": part1, "2": part2, "3": part3, "5": part5, "6": part6}[part](s, args)
        extra[f"part{part}"]["seconds"] = round(time.perf_counter() - t0, 1)
        s.note(f"== part {part} done in {time.perf_counter() - t0:.0f}s")
    s.finish(extra=extra)


if __name__ == "__main__":
    main()
