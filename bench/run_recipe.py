"""Issue #6: run the shipped recipe `finetune_GPT-NeoXT-Chat-Base-20B.sh` the way users copy it, and measure it.

The recipe is copied into a work dir and changed only where a user would change it: MODEL_LAYERS=44 -> L for a
model of another depth (an exact-match replacement that fails loudly when the text is not there; printed and
recorded). It then runs with the environment variables it reads: NUM_GPUS (--gpus: processes = pipeline stages),
TRAINER (the copy is not in the repository), MASTER_PORT (a free one), BASE_MODEL, DATASETS, CHECKPOINT_PATH,
FINETUNE_TOTAL_STEPS (--steps), CHECKPOINT_STEPS (= the same, so exactly one checkpoint: the end-of-run one),
PYTHON and EXTRA_ARGS="--metrics-file F --log-interval 1".

In order:
  1. a random-init GPT-NeoX-20B-width Hugging Face directory (hidden 6144, 64 heads, vocab 50432, --layers L) as
     bf16 safetensors, drawn on the GPU in a child process (bench_big.py's writer), so this process never holds a
     CUDA context;
  2. synthetic OIG chat jsonl under every `${DATASETS}/unified_*.jsonl` name the recipe lists (read from its text);
  3. the recipe, until it exits (it saves its checkpoint at the end) or the --time-budget is spent (then its
     process group is stopped);
  4. tools/convert_to_hf.py on that checkpoint (--dtype fp16, the training dtype: lossless);
  5. in a child process: our model (modules.build_stage over all layers, weights from the checkpoint's stage files)
     and transformers' AutoModelForCausalLM (from the export) on one batch of tokenizer ids from
     assets/data/sample_chat.jsonl, one model at a time on one GPU, in fp32 when it fits (else fp16; the JSON says
     which): max |logits difference|.
Reported: tokens/s and MFU over the steps after --warmup (the trainer's step_s, GUIDE §5 FLOPs, 989 TFLOP/s per
GPU), peak memory per GPU, launch (starting the recipe) to the first step's metrics line, checkpoint save time (the
trainer's "saved checkpoint ... (X s)" line), convert time, export size, the logits difference.
Written to $OUT/run_recipe.json, every process's output to $OUT/run_recipe.log. What it wrote (model, data,
checkpoint, export) is deleted at the end unless --keep; it refuses to start when the disk cannot hold
model (2) + checkpoint (14) + export (2) bytes per parameter.

Device command (4 GPUs, 12 layers: the 2026-11-27 run; half the layers, --layers 22, has stages of 6,6,5,5):
    python3 bench/run_recipe.py --gpus 4 --layers 12
CPU check (tiny model, 2 processes, a stand-in nvidia-smi, smaller batch and sequence; about a minute):
    python3 bench/run_recipe.py --smoke
"""

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    REPO,
    SAFE_ENV,
    SHAPES,
    Session,
    free_port,
    hf_config,
    read_jsonl,  # noqa: E402
    remove_stale,
    summarize,
    write_oig_data,
)

import modules  # noqa: E402  (the repository root is on sys.path now)

RECIPE = os.path.join(REPO, "finetune_GPT-NeoXT-Chat-Base-20B.sh")
CONVERTER = os.path.join(REPO, "tools", "convert_to_hf.py")
SAMPLE_TEXT = os.path.join(REPO, "assets", "data", "sample_chat.jsonl")
# Disk per parameter: the bf16 model we write, the checkpoint (fp16 weights 2 + fp32 master 4 + AdamW moments 8),
# the fp16 export.
DISK_BYTES_PER_PARAM = {"model": 2, "checkpoint": 14, "export": 2}
DATASET_TOKENS = 25_000  # per file: ~150 records, a few thousand over the 26 files (the loader cycles epochs)


# ----------------------------------------------------------------------------------------------------------------
# The recipe's text: file names, flag values, edits
# ----------------------------------------------------------------------------------------------------------------


def dataset_names(text: str) -> list[str]:
    names = re.findall(r"\$\{DATASETS\}/(unified_[A-Za-z0-9_]+\.jsonl)", text)
    if not names:
        sys.exit(f"run_recipe: no ${{DATASETS}}/unified_*.jsonl names found in {RECIPE}")
    return list(dict.fromkeys(names))


def flag_value(text: str, flag: str) -> str:
    """The value of `flag` in the recipe's ARGS=( ... ) array (its comments may mention flags too)."""
    block = re.search(r"^ARGS=\((.*?)^\)", text, re.S | re.M)
    found = re.findall(rf"{re.escape(flag)} (\S+)", block.group(1) if block else "")
    if len(found) != 1:
        sys.exit(f"run_recipe: expected one '{flag} VALUE' in the recipe, found {len(found)}")
    return found[0].strip('"')


def replace_once(text: str, old: str, new: str, why: str, edits: list[dict]) -> str:
    """An edit of the copied recipe: `old` must occur exactly once (an unchanged value is checked, not listed)."""
    count = text.count(old)
    if count != 1:
        sys.exit(
            f"run_recipe: cannot edit the recipe: {old!r} occurs {count} times in {RECIPE} (expected once); "
            f"the recipe changed, update run_recipe.py"
        )
    if new == old:
        return text
    edits.append({"old": old, "new": new, "why": why})
    return text.replace(old, new)


def user_edits(text: str, layers: int) -> tuple[str, list[dict]]:
    """The one edit a user makes for another depth of model; the GPU count, the trainer's path and the port are
    the recipe's environment variables (NUM_GPUS, TRAINER, MASTER_PORT)."""
    edits: list[dict] = []
    text = replace_once(text, "MODEL_LAYERS=44 ", f"MODEL_LAYERS={layers} ", "the model's depth", edits)
    return text, edits


def smoke_edits(text: str, hidden: int, edits: list[dict]) -> str:
    """CPU only: the tiny model's width, a batch and sequence that take seconds per step on 2 cores."""
    text = replace_once(text, "--embedding-dim 6144\n", f"--embedding-dim {hidden}\n", "smoke: tiny model", edits)
    text = replace_once(text, "--seq-length 2048 ", "--seq-length 256 ", "smoke: CPU speed", edits)
    return replace_once(text, "--batch-size 64 ", "--batch-size 4 ", "smoke: CPU speed", edits)


def write_fake_nvidia_smi(bin_dir: str, gpus: int) -> None:
    """--smoke: the recipe counts `nvidia-smi --list-gpus` lines before it starts anything."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "nvidia-smi")
    with open(path, "w") as f:
        f.write(
            "#!/bin/sh\n# run_recipe.py --smoke: a CPU machine standing in for one with GPUs\n"
            f'for i in $(seq 0 {gpus - 1}); do echo "GPU $i: CPU stand-in (UUID: GPU-smoke-$i)"; done\n'
        )
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


# ----------------------------------------------------------------------------------------------------------------
# Child processes (hidden flags): writing the model, comparing logits
# ----------------------------------------------------------------------------------------------------------------


def write_model(args) -> None:
    from bench_big import write_random_gptneox

    config = hf_config(args.shape, num_layers=args.layers)
    print(json.dumps(write_random_gptneox(args.write_model, config, args.device)))


def compare_logits(args) -> None:
    """Our full model (weights from the checkpoint's stage files) vs transformers' (from the export), one at a time
    on `args.device`, on the same token ids. Writes a JSON result to `args.result`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint.names import META, stage_model_file, step_dir_name
    from tools.convert_to_hf import StageFiles, resolve_step

    device = torch.device(args.device)
    folder = os.path.join(args.checkpoint, step_dir_name(resolve_step(args.checkpoint, None)))
    with open(os.path.join(folder, META)) as f:
        meta = json.load(f)
    stage_files = StageFiles([os.path.join(folder, stage_model_file(p)) for p in range(int(meta["layout"]["pp"]))])
    cfg = modules.load_model_config(args.base_model)
    params = modules.count_parameters(cfg)
    train_dtype = getattr(torch, meta["dtype"])
    dtype = torch.float32
    if device.type == "cuda" and params * 4 > 0.85 * torch.cuda.mem_get_info(device)[0]:
        dtype = train_dtype  # fp32 does not fit one GPU (e.g. all 44 layers): compare in the training dtype

    tokenizer = AutoTokenizer.from_pretrained(args.export)
    with open(SAMPLE_TEXT) as f:
        text = "\n".join(json.loads(line)["text"] for line in f if line.strip())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: 2 * args.tokens].view(2, args.tokens)
    result = {"compare_dtype": str(dtype).replace("torch.", ""), "batch_shape": list(ids.shape), "params": params}

    t = time.perf_counter()
    with torch.device("meta"):
        ours = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    ours = modules.materialize_stage(ours, device, dtype).eval()
    targets = ours.state_dict()
    if set(targets) != set(stage_files):
        result["checkpoint_names_differ"] = sorted(set(targets) ^ set(stage_files))[:10]
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(stage_files[name])
        ours_logits = ours(ids.to(device)).float().cpu()
    del ours, targets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["ours_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    # Loaded on the CPU in the export's dtype (device_map needs accelerate), then moved and cast on the device.
    hf, info = AutoModelForCausalLM.from_pretrained(args.export, dtype=train_dtype, output_loading_info=True)
    result["hf_loading_problems"] = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    hf = hf.to(device).to(dtype).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=ids.to(device)).logits.float().cpu()
    result["transformers_s"] = round(time.perf_counter() - t, 1)

    diff = (ours_logits - hf_logits).abs()
    result.update(
        max_abs_logits_diff=diff.max().item(),
        mean_abs_logits_diff=diff.mean().item(),
        max_abs_logit=ours_logits.abs().max().item(),
        argmax_agreement=(ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
    )
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="processes (one per GPU) and pipeline stages (smoke: 2)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the model (default 44, GPT-NeoX-20B)")
    ap.add_argument("--steps", type=int, default=20, help="FINETUNE_TOTAL_STEPS (smoke: 3)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s and MFU (smoke: 1)")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=560,
        help="seconds for everything; whatever still runs then is stopped (device limit: 600 s)",
    )
    ap.add_argument("--workdir", default=None, help="where model, data, checkpoint and export go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/run_recipe.json, else runs/bench/)")
    ap.add_argument("--keep", action="store_true", help="keep what was written (model, checkpoint, export)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny model, stand-in nvidia-smi")
    # Internal: child-process modes.
    ap.add_argument("--write-model", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="neox-20b", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-model", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.shape = "tiny"
        for name, value in (("gpus", 2), ("steps", 3), ("warmup", 1)):
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    args.layers = args.layers or SHAPES[args.shape]["num_layers"]
    args.run_timeout = args.time_budget  # Session's runner (recipe, export, logits): one budget for everything
    args.final_checkpoint = True  # the recipe runs to its end: its checkpoint is part of the measurement
    return args


def check_disk(args) -> dict:
    cfg = modules.model_config_from_dict(hf_config(args.shape, num_layers=args.layers).to_dict(), "gptneox")
    params = modules.count_parameters(cfg)
    need = params * sum(DISK_BYTES_PER_PARAM.values())
    where = args.workdir or tempfile.gettempdir()
    os.makedirs(where, exist_ok=True)
    free = shutil.disk_usage(where).free
    if need > free:
        sys.exit(
            f"run_recipe: {args.layers} layers ({params / 1e9:.1f}B parameters) need about {need / 1e9:.0f} GB "
            f"on disk (model 2 + checkpoint 14 + export 2 bytes per parameter) but {where} has "
            f"{free / 1e9:.0f} GB free; pass fewer --layers or a --workdir on a bigger disk"
        )
    return {"params": params, "disk_need_gb": round(need / 1e9, 1), "disk_free_gb": round(free / 1e9, 1)}


def dir_gb(path: str) -> float | None:
    if not os.path.isdir(path):
        return None
    return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e9, 3)


def main():
    args = parse_args()
    if args.write_model:
        return write_model(args)
    if args.compare:
        return compare_logits(args)

    disk = check_disk(args)
    s = Session("run_recipe", args)
    if s.gpu and s.env["gpus"] < args.gpus:
        sys.exit(f"run_recipe: --gpus {args.gpus} but torch sees {s.env['gpus']} GPU(s) here")
    w = s.workdir
    model_dir, data_dir = os.path.join(w, f"{args.shape}-L{args.layers}-hf"), os.path.join(w, "data")
    ckpt, export = os.path.join(w, "checkpoints"), os.path.join(w, "hf-export")
    script, metrics = os.path.join(w, "finetune_recipe.sh"), os.path.join(w, "metrics.jsonl")
    written = [
        model_dir,
        data_dir,
        ckpt,
        export,
        script,
        metrics,
        os.path.join(w, "bin"),
        os.path.join(w, "compare.json"),
    ]
    remove_stale(*written)  # a reused --workdir holds an earlier call's files
    s.note(
        f"{disk['params'] / 1e9:.2f}B parameters; disk: about {disk['disk_need_gb']} GB needed, "
        f"{disk['disk_free_gb']} GB free in {w}"
    )
    figures: dict = {}
    runs: list[dict] = []
    try:
        # 1. the model, in a child process (this one must hold no CUDA context while the recipe runs)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--write-model",
            model_dir,
            "--shape",
            args.shape,
            "--layers",
            str(args.layers),
            "--device",
            "cuda" if s.gpu else "cpu",
        ]
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=s.remaining())
        except subprocess.TimeoutExpired:
            sys.exit(f"run_recipe: writing the model took the whole --time-budget ({args.time_budget:.0f} s)")
        if done.returncode != 0:
            sys.exit(f"run_recipe: writing the model failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        model_written = json.loads(done.stdout.strip().splitlines()[-1])
        s.note(
            f"model: {model_written['gb']} GB bf16 in {model_written['files']} files "
            f"({model_written['seconds']}s), {model_dir}"
        )

        # 2. the datasets, under the recipe's own names
        with open(RECIPE) as f:
            original = f.read()
        names = dataset_names(original)
        os.makedirs(data_dir)
        for i, name in enumerate(names):
            write_oig_data(os.path.join(data_dir, name), DATASET_TOKENS, seed=i)
        lines = 0
        for name in names:
            with open(os.path.join(data_dir, name)) as f:
                lines += sum(1 for _ in f)
        s.note(f"data: {len(names)} files, {lines} OIG records in {data_dir}")

        # 3. the recipe, as a user would edit it
        text, edits = user_edits(original, args.layers)
        if args.smoke:
            text = smoke_edits(text, SHAPES[args.shape]["hidden_size"], edits)
        with open(script, "w") as f:
            f.write(text)
        for e in edits:
            s.note(f"edit: {e['old'].strip()!r} -> {e['new'].strip()!r} ({e['why']})")
        env = dict(
            os.environ,
            **SAFE_ENV,
            BASE_MODEL=model_dir,
            DATASETS=data_dir,
            CHECKPOINT_PATH=ckpt,
            FINETUNE_TOTAL_STEPS=str(args.steps),
            CHECKPOINT_STEPS=str(args.steps),
            PYTHON=sys.executable,
            NUM_GPUS=str(args.gpus),
            TRAINER=os.path.join(REPO, "dist_lm_pretrain_and_finetune.py"),
            MASTER_PORT=str(free_port()),
            EXTRA_ARGS=f"--metrics-file {metrics} --log-interval 1",
        )
        if args.smoke:
            write_fake_nvidia_smi(os.path.join(w, "bin"), args.gpus)
            env["PATH"] = os.path.join(w, "bin") + os.pathsep + env["PATH"]
            env.setdefault("OMP_NUM_THREADS", "1")  # 2 processes on 2 cores
            env["EXTRA_ARGS"] += " --use-cuda false"  # the recipe's default --use-cuda true refuses a CPU machine
            s.note(
                f"smoke: stand-in nvidia-smi listing {args.gpus} GPUs on PATH; OMP_NUM_THREADS=1; "
                f"EXTRA_ARGS += --use-cuda false"
            )
        recipe_env = {
            k: env[k]
            for k in (
                "BASE_MODEL",
                "DATASETS",
                "CHECKPOINT_PATH",
                "FINETUNE_TOTAL_STEPS",
                "CHECKPOINT_STEPS",
                "NUM_GPUS",
                "TRAINER",
                "MASTER_PORT",
                "PYTHON",
                "EXTRA_ARGS",
            )
        }
        s.note("recipe: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in recipe_env.items()) + f" bash {script}")

        seq, batch = int(flag_value(text, "--seq-length")), int(flag_value(text, "--batch-size"))
        micro, accum = int(flag_value(text, "--micro-batch-size")), int(flag_value(text, "--gradient-accumulate-step"))
        dp = int(flag_value(text, "--data-group-size"))
        args.seq_length = seq  # for Session's table
        tokens_per_step = batch * dp * accum * seq
        precision = "fp16" if "--fp16" in text else "bf16" if "--bf16" in text else "fp32"
        run = {
            "label": "recipe",
            "kind": "ours",
            "layout": {"pp": args.gpus, "dp": dp, "gpus": args.gpus},
            "schedule": flag_value(text, "--pp-mode"),
            "micro_batch": micro,
            "n_micro": batch // micro,
            "batch_per_replica": batch,
            "tokens_per_step": tokens_per_step,
            "precision": precision,
            "activation_checkpointing": flag_value(text, "--activation-checkpointing"),
            "optimizer": flag_value(text, "--optimizer"),
            "edits": edits,
            "env": recipe_env,
        }
        s.note(f"recipe: {args.gpus} processes, {args.steps} steps of {tokens_per_step} tokens, one checkpoint")
        with open(s.log_path) as f:
            before = len(f.read())
        run.update(s._run("recipe", ["bash", script], env, metrics, args.steps))
        with open(s.log_path) as f:
            out = f.read()[before:]  # the recipe's output (the ranks print the checkpoint's save time)
        if run.get("launch_to_last_step_s") is not None:
            run["last_step_to_exit_s"] = round(run["wall_s"] - run["launch_to_last_step_s"], 1)
        records = read_jsonl(metrics)
        fpt = float(modules.flops_per_token(modules.load_model_config(model_dir), seq))
        run.update(
            flops_per_token=fpt,
            step_records=records,
            **summarize(records, args.warmup, tokens_per_step, args.gpus, fpt, s.peak),
        )
        saved = re.findall(r"saved checkpoint (\S+) \(([\d.]+) s\)", out)
        run["checkpoint_save_s"] = float(saved[-1][1]) if saved else None
        run["checkpoint_gb"] = dir_gb(saved[-1][0]) if saved else None
        if run["status"] == "ok" and not saved:
            run["status"] = "no checkpoint line"
        runs.append(run)
        s.runs.append(run)
        s.note(
            f"recipe: {run['status']}, {run.get('steps_done', 0)} steps, first step after "
            f"{run.get('launch_to_first_step_s') or '-'} s, checkpoint save {run['checkpoint_save_s'] or '-'} s "
            f"({run['checkpoint_gb'] or '-'} GB)"
        )

        # 4. export
        conv = {"label": "export", "command": None}
        if saved and s.remaining() > 20:
            cmd = [sys.executable, CONVERTER, "--checkpoint-path", ckpt, "--output", export, "--dtype", "fp16"]
            conv.update(s._run("export", cmd, env, os.path.join(w, "no-metrics")))
            conv["export_gb"] = dir_gb(export)
            s.note(f"export: {conv['status']} in {conv['wall_s']}s, {conv['export_gb']} GB")
        else:
            conv["status"] = "skipped: no checkpoint" if not saved else "skipped: time budget spent"
        runs.append(conv)

        # 5. logits: ours (checkpoint) vs transformers (export)
        cmp_run = {"label": "logits", "command": None}
        result_file = os.path.join(w, "compare.json")
        if conv["status"] == "ok" and s.remaining() > 20:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--compare",
                "--base-model",
                model_dir,
                "--checkpoint",
                ckpt,
                "--export",
                export,
                "--device",
                "cuda" if s.gpu else "cpu",
                "--tokens",
                "256" if s.gpu else "64",
                "--result",
                result_file,
            ]
            cmp_run.update(s._run("logits", cmd, env, os.path.join(w, "no-metrics")))
            if os.path.exists(result_file):
                with open(result_file) as f:
                    cmp_run.update(json.load(f))
            s.note(
                f"logits: {cmp_run['status']}, max |ours - transformers| = "
                f"{cmp_run.get('max_abs_logits_diff')} in {cmp_run.get('compare_dtype')}"
            )
        else:
            cmp_run["status"] = "skipped: no export" if conv["status"] != "ok" else "skipped: time budget spent"
        runs.append(cmp_run)

        figures = {
            "tokens_per_s": run.get("tokens_per_s"),
            "tokens_per_s_per_gpu": run.get("tokens_per_s_per_gpu"),
            "mfu": run.get("mfu"),
            "peak_mem_gb_per_gpu": run.get("peak_mem_gb_per_gpu"),
            "launch_to_first_step_s": run.get("launch_to_first_step_s"),
            "trainer_launch_to_first_step_s": run.get("trainer_launch_to_first_step_s"),
            "checkpoint_save_s": run.get("checkpoint_save_s"),
            "checkpoint_gb": run.get("checkpoint_gb"),
            "last_step_to_exit_s": run.get("last_step_to_exit_s"),
            "convert_s": conv.get("wall_s"),
            "export_gb": conv.get("export_gb"),
            "max_abs_logits_diff": cmp_run.get("max_abs_logits_diff"),
            "compare_dtype": cmp_run.get("compare_dtype"),
            "argmax_agreement": cmp_run.get("argmax_agreement"),
        }
    finally:
        payload = {
            "benchmark": "run_recipe",
            "command": shlex.join(["python3", *sys.argv]),
            **s.env,
            "recipe": os.path.relpath(RECIPE, REPO),
            "layers": args.layers,
            "gpus_used": args.gpus,
            "page_cache": "warm (model just written)",
            "seq_length": getattr(args, "seq_length", None),
            "args": vars(args),
            **disk,
            "elapsed_s": round(s.elapsed(), 1),
            "figures": figures,
            "runs": runs,
            "targets": [],
        }
        with open(s.out, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        if args.keep:
            print(f"kept: {w}", flush=True)
        else:
            remove_stale(*written)
            if not args.workdir:
                shutil.rmtree(w, ignore_errors=True)
    if s.runs:
        s.print_table(None)
    print_figures(runs)
    print(f"JSON: {s.out}\nlog:  {s.log_path}", flush=True)
    return 0 if all(r["status"] == "ok" for r in runs) and len(runs) == 3 else 1


def print_figures(runs: list[dict]) -> None:
    run, conv, cmp_run = (runs + [{}, {}, {}])[:3]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    head = [
        "to step1 s",
        "ckpt save s",
        "ckpt GB",
        "convert s",
        "export GB",
        "max|dlogits|",
        "argmax agree",
        "status (recipe / export / logits)",
    ]
    row = [
        fmt(run.get("launch_to_first_step_s"), ".1f"),
        fmt(run.get("checkpoint_save_s"), ".1f"),
        fmt(run.get("checkpoint_gb"), ".2f"),
        fmt(conv.get("wall_s"), ".1f"),
        fmt(conv.get("export_gb"), ".2f"),
        fmt(cmp_run.get("max_abs_logits_diff"), ".3g")
        + (f" ({cmp_run['compare_dtype']})" if cmp_run.get("compare_dtype") else ""),
        fmt(cmp_run.get("argmax_agreement"), ".1%"),
        " / ".join(r.get("status", "-") for r in (run, conv, cmp_run)),
    ]
    widths = [max(len(a), len(b)) for a, b in zip(head, row)]
    print("  ".join(h.ljust(n) for h, n in zip(head, widths)))
    print("  ".join(c.ljust(n) for c, n in zip(row, widths)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
