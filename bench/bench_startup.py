"""Issue #31 item 5 (and #20 item 3 before it): launch -> first step, Pythia-1.4B shape on one GPU, and where the
seconds go.

  target a (#31.5): loading bf16 safetensors, no compile: launch -> first step no slower than the reference below
                    (transformers' from_pretrained + one step) in the same call;
  target b: --compile with a warm compile cache (the second launch on the same cache dir): <= 20 s;
  reported: random init, --compile with a cold cache, and the same load launched under torchrun.

Ours is launched as README tells a one-GPU user: `python3 dist_lm_pretrain_and_finetune.py --nproc-per-node 1 FLAGS`
(launcher mode, which trains a one-process job in its own process); one run under `python -m torch.distributed.run`
shows what torchrun's agent and second interpreter add. Launch -> first step is the wall time from starting the
command to the first step's line in the metrics file (polled every 0.2 s); the trainer's own breakdown (its
`startup_s` record: seconds since its interpreter started at the end of imports, process group, inputs, model build,
weights, data, optimizer, resume and the first step) is printed per run and kept in the JSON.

In order (a short --time-budget skips the last ones):
  1. a bf16 Hugging Face directory of the shape (transformers' GPTNeoXForCausalLM built on the device and written
     with save_pretrained, in a child process; its pages stay in the page cache, as after any recent write);
  2. REFERENCE, in the same call: bench/baseline_hf.py --load-weights --base-dtype bf16 (transformers
     GPTNeoXForCausalLM.from_pretrained(dir, dtype=bfloat16).to(cuda), SDPA, fused AdamW) as a subprocess, wall
     time to its first step;
  3. ours, random init (`--load-pretrained-model false`; the first run of ours also fills the compile cache with
     FlexAttention's document-mask kernel), then ours loading that directory;
  4. ours, random init again with PYTHONPROFILEIMPORTTIME=1: the top-level modules that cost most, kept in the JSON
     as `import_seconds`, and what each pulls in (`import_tree`: module, depth and seconds, 0.1 s or more);
  5. ours, --compile, TORCHINDUCTOR_CACHE_DIR a fresh empty directory (cold), then again on the same directory (warm);
  6. ours, loading the directory under torchrun.
Every run is stopped after its last step (--steps, default 2) without writing a checkpoint.

    python bench/bench_startup.py                 # one GPU, about 4 minutes
    python bench/bench_startup.py --smoke         # CPU check: tiny shape, no compile runs
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Session, add_common_args, apply_smoke, remove_stale  # noqa: E402

from training.startup import PHASES  # noqa: E402

MICRO_BATCH = 4  # one micro-batch of 4 x seq tokens per step, as bench_single_gpu's eager runs

WRITE_WEIGHTS = """
import sys, time, torch
from transformers import AutoConfig, GPTNeoXForCausalLM
path, device = sys.argv[1], sys.argv[2]
t = time.perf_counter()
torch.manual_seed(0)
with torch.device(device):
    model = GPTNeoXForCausalLM._from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
model.save_pretrained(path)
print(f"{time.perf_counter() - t:.1f}")
"""


def write_weights(session: Session, model_dir: str) -> str:
    """A copy of `model_dir` (config + tokenizer) with bf16 weights written by transformers' save_pretrained."""
    path = model_dir + "-bf16"
    if not os.path.exists(os.path.join(path, "config.json")) or not any(
        name.endswith(".safetensors") for name in os.listdir(path)
    ):
        shutil.copytree(model_dir, path, dirs_exist_ok=True)
        device = "cuda" if session.gpu else "cpu"
        done = subprocess.run(
            [sys.executable, "-c", WRITE_WEIGHTS, path, device], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            sys.exit(f"bench_startup: writing the weights failed:\n{done.stderr[-3000:]}")
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
        session.note(f"weights: {size / 2**30:.2f} GiB of bf16 safetensors in {done.stdout.strip()}s ({path})")
    return path


def startup_phases(run: dict) -> dict | None:
    """The trainer's start-up record of a run: {phase: seconds since its process started}."""
    for record in run.get("step_records") or []:
        if "startup_s" in record:
            return record["startup_s"]
    return None


def import_seconds(log_path: str, start: int, top: int = 15) -> list[tuple[str, float]]:
    """The costliest top-level imports in `log_path` after byte `start` (python -X importtime lines of every process
    the run started: 'import time: self [us] | cumulative | name'), seconds, largest first."""
    top_level = [(name, seconds) for depth, name, seconds in import_tree(log_path, start) if depth == 0]
    return sorted(top_level, key=lambda c: -c[1])[:top]


def import_tree(log_path: str, start: int, max_depth: int = 4, min_seconds: float = 0.1) -> list[tuple]:
    """(depth, module, cumulative seconds) of every import in `log_path` after byte `start` at most `max_depth` deep
    and costing at least `min_seconds`, in the log's order (a module's line comes after those of what it imported),
    so that the JSON shows which import pulls in what."""
    tree = []
    with open(log_path, errors="replace") as f:
        f.seek(start)
        for line in f:
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            _, cumulative, name = line.split("|")
            if not cumulative.strip().isdigit():
                continue
            depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
            seconds = int(cumulative) / 1e6
            if depth <= max_depth and seconds >= min_seconds:
                tree.append((depth, name.strip(), seconds))
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=2, warmup=1)
    parser.add_argument("--shape", default="pythia-1.4b", help="bench/common.py SHAPES key")
    parser.add_argument(
        "--masked-attention",
        choices=("flex", "varlen"),
        default=None,
        help="ours: this kernel (default: the trainer's)",
    )
    args = parser.parse_args()
    apply_smoke(args, parser)
    if args.smoke and args.steps == 3:
        args.steps = 2  # the first step is what counts
    session = Session("bench_startup", args)
    shape = "tiny" if args.smoke else args.shape
    model_dir = session.model_dir(shape)
    weights_dir = write_weights(session, model_dir)
    data = session.data_file(tokens=MICRO_BATCH * args.seq_length * (args.steps + 2))
    common = dict(data=data, nproc=1, micro_batch=MICRO_BATCH, batch=MICRO_BATCH, launcher="entrypoint")
    if args.masked_attention:
        common["extra"] = ["--masked-attention", args.masked_attention]

    # the reference first: it is what target a compares with, and a short time budget skips the last runs
    reference = session.baseline(
        "reference: transformers from_pretrained bf16",
        model_dir=weights_dir,
        micro_batch=MICRO_BATCH,
        accum=1,
        extra=["--load-weights", "--base-dtype", "bf16"],
        compile=False,
        describe={"precision": "bf16 (from_pretrained) + autocast"},
    )
    # random init first: the first run of ours on a machine also builds FlexAttention's document-mask kernel into
    # the compile cache (~8 s once; not with --masked-attention varlen, which compiles nothing); the load, target
    # a's run, then starts as every later launch does
    random_init = session.ours("random init", model_dir=model_dir, **common)
    loaded = session.ours("load bf16 safetensors", model_dir=weights_dir, load_pretrained=True, **common)
    start = os.path.getsize(session.log_path)
    os.environ["PYTHONPROFILEIMPORTTIME"] = "1"  # inherited by the trainer
    try:
        profiled = session.ours("random init, import times", model_dir=model_dir, **common)
    finally:
        os.environ.pop("PYTHONPROFILEIMPORTTIME")
    profiled["import_seconds"] = import_seconds(session.log_path, start)
    profiled["import_tree"] = import_tree(session.log_path, start)
    cold = warm = None
    if session.gpu:  # inductor on 2 CPU cores takes minutes even for the tiny shape: GPU runs only
        cache = tempfile.mkdtemp(prefix="inductor_", dir=session.workdir)
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # inherited by torchrun and the trainer
        try:
            cold = session.ours("compile, cold cache", model_dir=model_dir, compile=True, **common)
            warm = session.ours("compile, warm cache", model_dir=model_dir, compile=True, **common)
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if saved is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
        remove_stale(cache)
    under_torchrun = session.ours(
        "load bf16 safetensors, under torchrun",
        model_dir=weights_dir,
        load_pretrained=True,
        **{**common, "launcher": "torchrun"},
    )

    ref_s = reference.get("launch_to_first_step_s")
    for run in (random_init, loaded, under_torchrun, cold, warm):
        if run:
            run["startup_s"] = startup_phases(run)
            run["launch_ratio_to_reference"] = (
                run["launch_to_first_step_s"] / ref_s if run.get("launch_to_first_step_s") and ref_s else None
            )
    detail = f"reference (transformers from_pretrained + one step) {ref_s}s"
    loaded_s = loaded.get("launch_to_first_step_s")
    session.target(
        "a: launch -> first step loading bf16 safetensors, no compile, / the reference's",
        loaded_s / ref_s if loaded_s and ref_s else None,
        1.0,
        "<=",
        f"ours {loaded_s} s (under torchrun {under_torchrun.get('launch_to_first_step_s')} s, random init "
        f"{random_init.get('launch_to_first_step_s')} s); {detail}",
        ours=loaded,
        reference=reference,
    )
    session.target(
        "b: launch -> first step, --compile, warm cache (s)",
        warm and warm.get("launch_to_first_step_s"),
        20,
        "<=",
        f"cold cache {(cold or {}).get('launch_to_first_step_s', 'not run')} s; {detail}",
        ours=warm,
        reference=reference,
    )
    print("\nstart-up phases (seconds since the trainer process started, at the end of each phase):")
    print("  " + "run".ljust(26) + "".join(p[:11].rjust(12) for p in PHASES) + "   launch->step1 (wall)")
    for run in (random_init, loaded, under_torchrun, cold, warm):
        phases = run and run.get("startup_s")
        if phases:
            cells = "".join(f"{phases.get(p, float('nan')):12.1f}" for p in PHASES)
            print(f"  {run['label'][:26].ljust(26)}{cells}   {run.get('launch_to_first_step_s')}")
    print("\ncostliest top-level imports of the profiled launch (seconds):")
    for name, seconds in profiled["import_seconds"]:
        print(f"  {seconds:7.2f}  {name}")
    print("\nwhat they pull in (0.3 s or more, two levels deep; a module follows what it imported):")
    for depth, name, seconds in profiled["import_tree"]:
        if depth <= 2 and seconds >= 0.3:
            print(f"  {seconds:7.2f}  {'  ' * depth}{name}")
    session.finish(extra={"micro_batch": MICRO_BATCH, "shape": shape})


if __name__ == "__main__":
    main()
