"""Shared pieces of the GPU benchmarks (bench_single_gpu / bench_pipeline / bench_dp / bench_big).

Each benchmark script builds a `Session` and then, top to bottom:
  1. writes a model directory (config.json + the bundled tokenizer; weights only where a run loads them),
  2. writes a synthetic OIG-style jsonl with enough tokens for every run,
  3. runs the BASELINE (`bench/baseline_hf.py`: transformers GPTNeoXForCausalLM, bf16 autocast, SDPA, fused AdamW
     on fp32 parameters) in a subprocess,
  4. launches OUR trainer, the real entrypoint under torchrun, once per variant, reading its --metrics-file,
  5. prints a table and writes one JSON (and one log of every process's output beside it).

Throughput is measured by the trainer's own step timer (`step_s` in the metrics file, one record per optimizer
step with --log-interval 1): tokens/s = tokens per step x timed steps / sum(step_s), after `--warmup` steps.
MFU follows GUIDE §5: 6·N_nonembedding + 12·L·d·S FLOPs per token (`modules.flops_per_token`, the same function
the trainer logs with), against a per-GPU dense bf16 peak (989 TFLOP/s for H100 and H200).

Runs never write their final checkpoint: the session stops the job (SIGTERM to its process group) as soon as the
last step's metrics line is written, unless --final-checkpoint is given (then the save is in `wall_s`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ENTRY = os.path.join(REPO, "dist_lm_pretrain_and_finetune.py")
BASELINE = os.path.join(REPO, "bench", "baseline_hf.py")
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
EOS_ID = 50256  # <|endoftext|> of the bundled GPT-2 tokenizer

# GPT-NeoX shapes (rotary_pct 0.25, parallel residual, intermediate 4h, untied head), as in the Pythia / NeoX configs.
SHAPES = {
    "pythia-410m": dict(hidden_size=1024, num_layers=24, num_heads=16, vocab_size=50304),
    "pythia-1.4b": dict(hidden_size=2048, num_layers=24, num_heads=16, vocab_size=50304),
    "pythia-2.8b": dict(hidden_size=2560, num_layers=32, num_heads=32, vocab_size=50304),
    "pythia-6.9b": dict(hidden_size=4096, num_layers=32, num_heads=32, vocab_size=50432),
    "neox-20b": dict(hidden_size=6144, num_layers=44, num_heads=64, vocab_size=50432),
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, vocab_size=50304),  # --smoke
    # Qwen3 shapes (GQA, head_dim 128 apart from hidden/heads, q/k norms, SwiGLU, untied head)
    "qwen3-8b": dict(
        family="qwen3",
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
    ),
    # Llama 3.1 shapes (GQA, SwiGLU, llama3 rope scaling to 128k positions, untied head)
    "llama3-8b": dict(
        family="llama",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    # issue 27's rows: Gemma-3-4B (text; 5 sliding : 1 global layers, 262k vocabulary, tied head) and Qwen2.5-32B
    "gemma3-4b": dict(
        family="gemma3",
        hidden_size=2560,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        intermediate_size=10240,
        vocab_size=262208,
    ),
    "qwen2.5-32b": dict(
        family="qwen2",
        hidden_size=5120,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=27648,
        vocab_size=152064,
    ),
    "gemma3-tiny": dict(  # --smoke
        family="gemma3",
        hidden_size=64,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=50304,
    ),
    "qwen2-tiny": dict(  # --smoke
        family="qwen2",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=50304,
    ),
    "llama-tiny": dict(  # --smoke
        family="llama",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=50304,
    ),
    "qwen3-tiny": dict(  # --smoke
        family="qwen3",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=128,
        vocab_size=50304,
    ),
}

# NVLink multicast stays off on the lent machines (KINDS.md); set for every process we start.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "PYTHONUNBUFFERED": "1",
}


# ----------------------------------------------------------------------------------------------------------------
# Flags every benchmark takes
# ----------------------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, steps: int = 20, warmup: int = 5) -> None:
    g = parser.add_argument_group("common")
    g.add_argument(
        "--smoke",
        action="store_true",
        help="CPU/gloo, tiny model, short sequences, 3 steps, fp32: checks the script end to end",
    )
    g.add_argument(
        "--out",
        default=None,
        help="JSON result path (default: $OUT/<script>.json, else runs/bench/<script>.json); "
        "all process output goes to the same path with .log",
    )
    g.add_argument("--workdir", default=None, help="model dirs, data and checkpoints (default: a temp dir, removed)")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    g.add_argument("--warmup", type=int, default=warmup, help="first steps left out of the averages")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument(
        "--time-budget",
        type=float,
        default=520,
        help="seconds for the whole script; runs that would start later are skipped, a run is stopped "
        "when the budget is spent (keep it under the device's 600 s per command)",
    )
    g.add_argument("--run-timeout", type=float, default=300, help="seconds one run may take at most")
    g.add_argument(
        "--final-checkpoint",
        action="store_true",
        help="let our runs write their end-of-run checkpoint (default: stop them after the last step)",
    )
    g.add_argument("--baseline-compile", action="store_true", help="torch.compile the baseline model")
    g.add_argument("--no-baseline", action="store_true", help="skip the baseline run")


def apply_smoke(args, parser: argparse.ArgumentParser) -> None:
    """--smoke: sequence length and step counts that finish in seconds on 2 CPU cores (unless given)."""
    if args.smoke:
        for name, value in (("seq_length", 64), ("steps", 3), ("warmup", 1)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)


# ----------------------------------------------------------------------------------------------------------------
# Environment: card, versions, commit
# ----------------------------------------------------------------------------------------------------------------


def gpu_inventory() -> list[dict]:
    """[{name, memory_gb}] per visible GPU, asked of a child process so that this one never holds a CUDA context
    (it would sit on GPU 0 during every run)."""
    probe = (
        "import json, torch; print(json.dumps([{'name': torch.cuda.get_device_name(i), 'memory_gb': "
        "round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)} "
        "for i in range(torch.cuda.device_count())]))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []


def peak_flops(card: str) -> tuple[float | None, str]:
    """The trainer's own table (training/metrics.py), so both sides of a ratio use one peak."""
    from training.metrics import peak_for_name

    value, label = peak_for_name(card)
    return value, f"{label} per GPU" if value else label


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # the device's copy of the tree may carry no usable git history
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
            return sha
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCH_COMMIT", "unknown")


def environment(smoke: bool) -> dict:
    import torch
    import transformers

    if not smoke and not os.environ.get("BENCH_COMMIT"):
        # A copy of the tree on a lent machine may carry a stale or no git history: the JSON must name the code run.
        sys.exit("bench: set BENCH_COMMIT=<the commit of the code measured> (the JSON records it); --smoke needs none")
    gpus = [] if smoke else gpu_inventory()
    card = gpus[0]["name"] if gpus else "cpu"
    peak, peak_label = peak_flops(card) if gpus else (None, "cpu: MFU not computed")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "card": card,
        "gpus": len(gpus),
        "gpu_memory_gb": gpus[0]["memory_gb"] if gpus else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "commit": git_commit(),
        "peak_flops": peak,
        "peak_label": peak_label,
        "mfu_formula": "6*N_nonembedding + 12*L*d*S FLOPs per token (GUIDE 5)",
    }


# ----------------------------------------------------------------------------------------------------------------
# Model directories and data
# ----------------------------------------------------------------------------------------------------------------


def hf_config(shape: str, num_layers: int | None = None, max_positions: int = 2048):
    from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

    s = SHAPES[shape]
    if s.get("family") == "gemma3":  # google/gemma-3-4b-pt's text config
        return Gemma3TextConfig(
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            num_hidden_layers=num_layers or s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            head_dim=s["head_dim"],
            intermediate_size=s["intermediate_size"],
            query_pre_attn_scalar=s["head_dim"],
            sliding_window=1024,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
            max_position_embeddings=max(131_072, max_positions),
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=EOS_ID,
            eos_token_id=EOS_ID,
        )
    if s.get("family") == "qwen2":  # Qwen/Qwen2.5-32B's config
        return Qwen2Config(
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            num_hidden_layers=num_layers or s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            intermediate_size=s["intermediate_size"],
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-5,
            max_position_embeddings=max(32_768, max_positions),
            tie_word_embeddings=False,
            bos_token_id=EOS_ID,
            eos_token_id=EOS_ID,
        )
    if s.get("family") == "llama":
        return LlamaConfig(
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            num_hidden_layers=num_layers or s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            head_dim=s["head_dim"],
            intermediate_size=s["intermediate_size"],
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=max(131_072, max_positions),
            tie_word_embeddings=False,
            bos_token_id=EOS_ID,
            eos_token_id=EOS_ID,
        )
    if s.get("family") == "qwen3":
        return Qwen3Config(
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            num_hidden_layers=num_layers or s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            head_dim=s["head_dim"],
            intermediate_size=s["intermediate_size"],
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            max_position_embeddings=max(2048, max_positions),
            tie_word_embeddings=False,
            bos_token_id=EOS_ID,
            eos_token_id=EOS_ID,
        )
    return GPTNeoXConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        num_hidden_layers=num_layers or s["num_layers"],
        num_attention_heads=s["num_heads"],
        intermediate_size=4 * s["hidden_size"],
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=max(2048, max_positions),
        tie_word_embeddings=False,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )


def write_model_dir(path: str, shape: str, num_layers: int | None = None, max_positions: int = 2048) -> str:
    """config.json + tokenizer files; no weights (runs use --load-pretrained-model false unless they write some)."""
    os.makedirs(path, exist_ok=True)
    hf_config(shape, num_layers, max_positions).save_pretrained(path)
    for name in os.listdir(TOKENIZER):
        shutil.copy2(os.path.join(TOKENIZER, name), path)
    return path


def model_shape(model_dir: str) -> dict:
    """Shape and FLOPs of a model directory, as the trainer sees it."""
    import modules

    cfg = modules.load_model_config(model_dir)
    return {
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "params": modules.count_parameters(cfg),
        "params_nonembedding": modules.count_parameters(cfg, include_embedding=False),
    }


def baseline_layers_that_fit(
    shape: str, layers: int, micro_batch: int, seq_length: int, gpu_memory_gb: float | None
) -> int:
    """Most layers (<= `layers`) of `shape` whose transformers baseline should fit one GPU: a deliberately generous
    estimate of fp32 weights + grads + AdamW moments + bf16 autocast copies (18 B/param), activations (~50 B per
    hidden unit per token per layer with SDPA) and logits (~12 B per vocab entry per token), plus 2 GB."""
    if not gpu_memory_gb:
        return layers
    s = SHAPES[shape]
    h, v, tokens = s["hidden_size"], s["vocab_size"], micro_batch * seq_length
    for n in range(layers, 0, -1):
        params = n * 12 * h * h + 2 * v * h
        need = 18 * params + n * tokens * h * 50 + tokens * v * 12 + 2 * 2**30
        if need <= 0.9 * gpu_memory_gb * 2**30:
            return n
    return 1


def flops_per_token(model_dir: str, seq_length: int) -> float:
    import modules

    return float(modules.flops_per_token(modules.load_model_config(model_dir), seq_length))


def lora_flops_per_token(model_dir: str, seq_length: int, r: int, alpha: float, targets: str | None) -> float:
    """Issue 14's "LoRA MFU" FLOPs per token, 4·N_base + 6·N_lora + 12·L·d·S (the trainer's own function)."""
    import modules

    cfg = modules.load_model_config(model_dir)
    return float(modules.lora_flops_per_token(cfg, modules.make_lora_config(cfg, r, alpha, 0.0, targets), seq_length))


_WORDS = (
    "the of and to in is was for that with as on by at from his her an which or be are it this had not but "
    "have were one their all been has also its new who more after first two other when time into only some "
    "year over people could would about many most these then than what your how there know make like "
    "water history city music world school family country river system number between during under "
    "because through government company important example different question answer explain simple"
).split()


def write_oig_data(path: str, tokens: int, seed: int = 0) -> str:
    """OIG-style `{"text": "<human>: ...\\n<bot>: ..."}` records of random words, about `tokens` GPT-2 tokens
    (1.5x margin; the loader cycles epochs anyway)."""
    rng = random.Random(seed)
    target_bytes = int(tokens * 5.0 * 1.5) + 10_000  # random English-ish words: ~5 bytes per token
    written = 0
    with open(path, "w") as f:
        while written < target_bytes:
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40)))
            a = " ".join(
                rng.choice(_WORDS) if rng.random() < 0.9 else str(rng.randint(0, 99999))
                for _ in range(rng.randint(40, 400))
            )
            line = json.dumps({"text": f"<human>: {q}?\n<bot>: {a}."}) + "\n"
            f.write(line)
            written += len(line)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group we started (torchrun and its workers), SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 20.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: str, start: int, lines: int = 10) -> str:
    """The error lines of a run's output (the trainer's one-line `error:`, exceptions), then its last lines."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    all_lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in all_lines if line.startswith("error:") or "Error:" in line or "OutOfMemory" in line]
    errors = list(dict.fromkeys(errors))[-6:]  # unique, in order
    return "\n".join(errors + ["..."] + all_lines[-lines:] if errors else all_lines[-lines:])


def remove_stale(*paths: str) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written
    return out


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def summarize(
    step_records: list[dict], warmup: int, tokens_per_step: int, world: int, fpt: float, peak: float | None
) -> dict:
    """Throughput over the steps after `warmup` (sum of step times), memory over all steps."""
    train = [r for r in step_records if "step_s" in r]
    timed = [r for r in train if r["step"] > warmup]
    out: dict = {"steps_done": max((r["step"] for r in train), default=0), "steps_timed": len(timed)}
    if timed:
        seconds = sum(r["step_s"] for r in timed)
        tps = tokens_per_step * len(timed) / seconds
        out.update(
            tokens_per_s=tps,
            tokens_per_s_per_gpu=tps / world,
            step_s=seconds / len(timed),
            tflops_per_gpu=tps * fpt / world / 1e12,
            mfu=tps * fpt / (world * peak) if peak else None,
        )
    per_rank = [r["mem_gb_per_rank"] for r in train if r.get("mem_gb_per_rank")]
    if per_rank:
        out["peak_mem_gb_per_gpu"] = [round(max(col), 2) for col in zip(*per_rank)]
        out["max_mem_gb"] = max(out["peak_mem_gb_per_gpu"])
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    if losses:
        out["loss_first"], out["loss_last"] = losses[0], losses[-1]
        out["loss_finite"] = all(math.isfinite(x) for x in losses)
    skipped = sum(1 for r in train if r.get("skipped"))
    if skipped:
        out["skipped_steps"] = skipped  # fp16 overflow: no optimizer update, so a cheaper step
    trainer_mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    if trainer_mfu:
        out["trainer_mfu_mean"] = sum(trainer_mfu) / len(trainer_mfu)
    if train and "launch_to_first_step_s" in train[0]:
        out["trainer_launch_to_first_step_s"] = train[0]["launch_to_first_step_s"]
    return out


def run_losses(run: dict) -> dict[int, float]:
    """{step: loss} of a run's metrics records."""
    return {r["step"]: r["loss"] for r in run.get("step_records", []) if r.get("loss") is not None}


def relative_loss_gaps(reference: dict, other: dict) -> dict[int, float]:
    """{step: |other - reference| / |reference|} over the steps both runs logged."""
    ref, oth = run_losses(reference), run_losses(other)
    return {k: abs(oth[k] - ref[k]) / abs(ref[k]) for k in sorted(set(ref) & set(oth)) if ref[k]}


def ratio(a, b):
    return a / b if a and b else None


def reference_variants(text: str, batch: int) -> list[dict]:
    """transformers configurations to sweep, a comma list of `+`-joined words: mbN (micro-batch; must divide the
    step's `batch`), compile (torch.compile the model), gc (gradient checkpointing), liger (liger-kernel's kernels).
    Each: {label, mb, compile, gc, liger, flags (baseline_hf.py's, beyond --compile)}."""
    out = []
    for label in (t.strip() for t in text.split(",") if t.strip()):
        v = {"label": label, "mb": 1, "compile": False, "gc": False, "liger": False}
        for word in label.split("+"):
            if word.startswith("mb") and word[2:].isdigit():
                v["mb"] = int(word[2:])
            elif word in ("compile", "gc", "liger"):
                v[word] = True
            else:
                sys.exit(f"reference variant {label!r}: unknown word {word!r} (mbN, compile, gc, liger)")
        if batch % v["mb"]:
            sys.exit(f"reference variant {label!r}: micro-batch {v['mb']} does not divide the step's {batch}")
        v["flags"] = (["--gradient-checkpointing"] if v["gc"] else []) + (["--liger"] if v["liger"] else [])
        out.append(v)
    return out


def figure(run: dict | None) -> str | None:
    """A run in one phrase for RESULTS.md: label, tokens/s (per GPU), MFU, peak memory."""
    if not run:
        return None
    if run.get("tokens_per_s") is None:
        return f"{run['label']}: {run.get('status')}"
    per_gpu = f" ({run['tokens_per_s_per_gpu']:,.0f}/GPU)" if run["layout"]["gpus"] > 1 else ""
    mfu = f", MFU {run['mfu']:.1%}" if run.get("mfu") is not None else ""
    mem = f", {run['max_mem_gb']:.1f} GB/GPU" if run.get("max_mem_gb") is not None else ""
    return f"{run['label']}: {run['tokens_per_s']:,.0f} tok/s{per_gpu}{mfu}{mem}"


# ----------------------------------------------------------------------------------------------------------------
# The session: runs, budget, table, JSON
# ----------------------------------------------------------------------------------------------------------------


class Session:
    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.t0 = time.perf_counter()
        self.env = environment(args.smoke)
        if not args.smoke and self.env["gpus"] == 0:
            sys.exit(f"{name}: torch sees no GPU here; use --smoke for the CPU check")
        self.gpu = not args.smoke
        self.peak = self.env["peak_flops"]
        out_dir = os.environ.get("OUT") or os.path.join(REPO, "runs", "bench")
        self.out = args.out or os.path.join(out_dir, f"{name}.json")
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        self.log_path = os.path.splitext(self.out)[0] + ".log"
        open(self.log_path, "w").close()
        self._tmp = None
        if args.workdir:
            self.workdir = args.workdir
            os.makedirs(self.workdir, exist_ok=True)
        else:
            self._tmp = tempfile.mkdtemp(prefix=f"{name}_")
            self.workdir = self._tmp
        self.runs: list[dict] = []
        self.targets: list[dict] = []
        gpus = f" x{self.env['gpus']}" if self.gpu else ""
        print(
            f"== {name}: {self.env['card']}{gpus}, torch "
            f"{self.env['torch']}, transformers {self.env['transformers']}, commit {self.env['commit'][:12]}; "
            f"peak {self.env['peak_label']}; log {self.log_path}",
            flush=True,
        )

    # -------------------------------------------------------------- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.args.time_budget - self.elapsed()

    def note(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)
        with open(self.log_path, "a") as f:
            f.write(f"\n##### [{self.elapsed():.1f}s] {message}\n")

    # -------------------------------------------------------------- inputs
    def model_dir(self, shape: str, num_layers: int | None = None) -> str:
        layers = num_layers or SHAPES[shape]["num_layers"]
        path = os.path.join(self.workdir, f"{shape}-L{layers}")
        if not os.path.exists(os.path.join(path, "config.json")):
            write_model_dir(path, shape, layers, self.args.seq_length)
        return path

    def data_file(self, tokens: int) -> str:
        path = os.path.join(self.workdir, f"oig_{tokens}.jsonl")
        if not os.path.exists(path):
            t = time.perf_counter()
            write_oig_data(path, tokens)
            self.note(
                f"data: {os.path.getsize(path) / 2**20:.1f} MB of OIG records for {tokens:,} tokens "
                f"({time.perf_counter() - t:.1f}s)"
            )
        return path

    # -------------------------------------------------------------- running processes
    def _run(
        self, label: str, cmd: list[str], env: dict, metrics_file: str, last_step: int | None = None, stop_when=None
    ) -> dict:
        """Run `cmd` in its own process group, watching its `metrics_file` for the first step; stop it once
        `last_step` shows there (when given, unless --final-checkpoint), once `stop_when(records)` holds (when
        given: instead of `last_step`), at --run-timeout, or when the time budget is spent."""
        timeout = min(self.args.run_timeout, self.remaining())
        with open(self.log_path, "a") as log:
            log.write(f"\n##### {label}\n##### {shlex.join(cmd)}\n")
            log.flush()
            start_offset = log.tell()
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            first_step_at = last_step_at = None
            status = None
            while True:
                rc = proc.poll()
                records = read_jsonl(metrics_file)
                steps = [r["step"] for r in records if "step_s" in r]
                now = time.perf_counter() - t0
                if steps and first_step_at is None:
                    first_step_at = now
                if stop_when is not None and stop_when(records):
                    stop_group(proc)
                    log.write(f"\n##### {label}: stopped by the benchmark (what it measures is done)\n")
                    status = "ok"
                    break
                if last_step and steps and max(steps) >= last_step and last_step_at is None:
                    last_step_at = now
                    if not self.args.final_checkpoint and stop_when is None:
                        stop_group(proc)
                        log.write(
                            f"\n##### {label}: stopped by the benchmark after step {last_step} "
                            f"(no final checkpoint; tracebacks above from the stop are expected)\n"
                        )
                        status = "ok"
                        break
                if rc is not None:
                    status = "ok" if rc == 0 else f"exit {rc}"
                    break
                if now > timeout:
                    stop_group(proc)
                    status = "timeout" if timeout >= self.args.run_timeout else "time budget spent"
                    break
                time.sleep(0.2)
            wall = time.perf_counter() - t0
        result = {
            "status": status,
            "wall_s": round(wall, 1),
            "command": shlex.join(cmd),
            "launch_to_first_step_s": round(first_step_at, 1) if first_step_at is not None else None,
            "launch_to_last_step_s": round(last_step_at, 1) if last_step_at is not None else None,
        }
        if status != "ok" or (last_step and last_step_at is None and stop_when is None):
            if status == "ok":
                result["status"] = "no metrics"
            result["error_tail"] = log_tail(self.log_path, start_offset)
            print(
                f"--- {label}: {result['status']}; last lines of its output:\n{result['error_tail']}\n---", flush=True
            )
        return result

    def ours(
        self,
        label: str,
        *,
        model_dir: str,
        data: str,
        nproc: int,
        pp: int = 1,
        dp: int = 1,
        micro_batch: int,
        batch: int,
        accum: int = 1,
        schedule: str = "gpipe",
        compile: bool = False,
        fp16: bool = False,
        activation_checkpointing: str = "none",
        optimizer: str = "adam",
        load_pretrained: bool = False,
        extra: list[str] | None = None,
        flops: float | None = None,
        stop_when=None,
        tokens_per_step: int | None = None,
        launcher: str = "torchrun",
    ) -> dict:
        """One launch of the real entrypoint; `batch` is per data-parallel replica per iteration,
        `accum` iterations per optimizer step (--gradient-accumulate-step).
        `flops`: FLOPs per token for MFU when not the dense 6·N + 12·L·d·S (LoRA: `lora_flops_per_token`).
        `stop_when(metrics records)`: stop the run once it holds (instead of after the last step).
        `tokens_per_step`: when a step trains other than batch x dp x accum x seq tokens (preference pairs: 2 rows).
        `launcher`: "torchrun" (`python -m torch.distributed.run`) or "entrypoint" (its own launcher mode,
        `--nproc-per-node`, which trains a one-process job in its own process)."""
        a = self.args
        run = {
            "label": label,
            "kind": "ours",
            "launcher": launcher,
            "layout": {"pp": pp, "dp": dp, "gpus": nproc},
            "schedule": schedule,
            "micro_batch": micro_batch,
            "n_micro": batch // micro_batch,
            "batch_per_replica": batch,
            "accumulation": accum,
            "tokens_per_step": tokens_per_step or batch * dp * accum * a.seq_length,
            "compile": compile,
            "activation_checkpointing": activation_checkpointing,
            "precision": "fp16" if fp16 else ("bf16" if self.gpu else "fp32"),
            "optimizer": optimizer,
            "model": model_shape(model_dir),
        }
        if self.remaining() < 45:
            run["status"] = "skipped (time budget)"
            self.note(f"{label}: skipped, {self.remaining():.0f}s of the time budget left")
            self.runs.append(run)
            return run
        tag = f"{len(self.runs):02d}"
        metrics = os.path.join(self.workdir, f"metrics_{tag}.jsonl")
        ckpt = os.path.join(self.workdir, f"ckpt_{tag}")
        remove_stale(metrics, ckpt)  # a reused --workdir holds an earlier call's files
        flags = [
            "--model-name",
            model_dir,
            "--task-name",
            data,
            "--seq-length",
            str(a.seq_length),
            "--batch-size",
            str(batch),
            "--micro-batch-size",
            str(micro_batch),
            "--pipeline-group-size",
            str(pp),
            "--data-group-size",
            str(dp),
            "--pp-mode",
            schedule,
            "--gradient-accumulate-step",
            str(accum),
            "--total-steps",
            str(a.steps * accum),  # counts iterations, as OpenChatKit's flag does
            "--warmup-steps",
            "0",
            "--lr",
            "1e-5",
            "--optimizer",
            optimizer,
            "--activation-checkpointing",
            activation_checkpointing,
            "--load-pretrained-model",
            "true" if load_pretrained else "false",
            "--checkpoint-path",
            ckpt,
            "--checkpoint-steps",
            "0",
            "--keep-checkpoints",
            "1",
            "--load-checkpoint",
            "false",
            "--log-interval",
            "1",
            "--metrics-file",
            metrics,
        ]
        if self.gpu:
            flags += ["--use-cuda", "true", "--dp-backend", "nccl"]
            flags += ["--fp16"] if fp16 else ["--bf16"]
        else:
            flags += ["--use-cuda", "false", "--dp-backend", "gloo"] + (["--fp16"] if fp16 else [])
        if compile:
            flags.append("--compile")
        flags += extra or []
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
            cmd += [f"--master_port={free_port()}", ENTRY, *flags]
        else:
            cmd = [sys.executable, ENTRY, f"--nproc-per-node={nproc}", *flags]
        env = dict(os.environ, **SAFE_ENV)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        self.note(
            f"{label}: ours, {nproc} process(es), pp={pp} dp={dp} {schedule} mb={micro_batch} "
            f"x{batch // micro_batch}{f' accum {accum}' if accum > 1 else ''}{' compile' if compile else ''}"
            f"{' fp16' if fp16 else ''}"
        )
        run.update(self._run(label, cmd, env, metrics, a.steps, stop_when))
        records = read_jsonl(metrics)
        run["step_records"] = records
        fpt = flops or flops_per_token(model_dir, a.seq_length)
        run["flops_per_token"] = fpt
        run.update(summarize(records, a.warmup, run["tokens_per_step"], nproc, fpt, self.peak))
        if run["status"] == "ok" and not run.get("steps_timed"):
            run["status"] = "too few steps"
        self.runs.append(run)
        self.note(f"{label}: {self._one_line(run)}")
        return run

    def baseline(
        self,
        label: str,
        *,
        model_dir: str,
        micro_batch: int,
        accum: int,
        extra: list[str] | None = None,
        flops: float | None = None,
        compile: bool | None = None,
        describe: dict | None = None,
        script: str | None = None,
        tokens_per_step: int | None = None,
    ) -> dict:
        """transformers GPTNeoXForCausalLM on one device (bench/baseline_hf.py), `micro_batch` x `accum` sequences
        per optimizer step. `extra`: more baseline_hf.py flags (LoRA, quantisation, data); `flops`: FLOPs per token
        for MFU (default dense); `compile`: overrides --baseline-compile; `describe`: run fields to override
        (precision, optimizer, activation_checkpointing) for the table and JSON. `script`: another baseline taking
        baseline_hf.py's flags and writing its files (bench/baseline_dpo_trl.py); `tokens_per_step`: as in `ours`."""
        a = self.args
        compile = a.baseline_compile if compile is None else compile
        run = {
            "label": label,
            "kind": "baseline",
            "layout": {"pp": 1, "dp": 1, "gpus": 1},
            "schedule": "-",
            "micro_batch": micro_batch,
            "n_micro": accum,
            "batch_per_replica": micro_batch * accum,
            "tokens_per_step": tokens_per_step or micro_batch * accum * a.seq_length,
            "compile": compile,
            "activation_checkpointing": "none",
            "precision": "bf16 autocast" if self.gpu else "fp32",
            "optimizer": "torch AdamW fused" if self.gpu else "torch AdamW",
            "model": model_shape(model_dir),
            **(describe or {}),
        }
        if a.no_baseline or self.remaining() < 45:
            run["status"] = "skipped" if a.no_baseline else "skipped (time budget)"
            self.runs.append(run)
            return run
        result_file = os.path.join(self.workdir, f"baseline_{len(self.runs):02d}.json")
        remove_stale(result_file, result_file + "l")
        cmd = [
            sys.executable,
            script or BASELINE,
            "--model-dir",
            model_dir,
            "--seq-length",
            str(a.seq_length),
            "--micro-batch-size",
            str(micro_batch),
            "--accum",
            str(accum),
            "--steps",
            str(a.steps),
            "--device",
            "cuda" if self.gpu else "cpu",
            "--out",
            result_file,
            "--metrics-file",
            result_file + "l",
        ]
        if compile:
            cmd.append("--compile")
        cmd += extra or []
        env = dict(os.environ, **SAFE_ENV)
        who = os.path.basename(script) if script else "transformers"
        self.note(f"{label}: baseline ({who}), mb={micro_batch} x{accum}")
        run.update(self._run(label, cmd, env, result_file + "l"))
        records = read_jsonl(result_file + "l")
        extra = json.load(open(result_file)) if os.path.exists(result_file) else {}
        run["step_records"] = records
        fpt = flops or flops_per_token(model_dir, a.seq_length)
        run["flops_per_token"] = fpt
        run.update(summarize(records, a.warmup, run["tokens_per_step"], 1, fpt, self.peak))
        for key in ("device_name", "peak_mem_gb", "error", "quantized_by", "trainable_params", "adapter_dtype", "info"):
            if key in extra:
                run[key] = extra[key]
        if "peak_mem_gb" in extra:
            run["peak_mem_gb_per_gpu"] = [extra["peak_mem_gb"]]
            run["max_mem_gb"] = extra["peak_mem_gb"]
        if extra.get("error"):
            run["status"] = extra["error"].split(":")[0]
        elif run["status"] == "ok" and not run.get("steps_timed"):
            run["status"] = "too few steps"
        self.runs.append(run)
        self.note(f"{label}: {self._one_line(run)}")
        return run

    # -------------------------------------------------------------- targets and output
    def target(
        self,
        name: str,
        value,
        threshold: float,
        compare: str = ">=",
        detail: str = "",
        ours: dict | None = None,
        reference: dict | None = None,
    ) -> None:
        """Record a target; `ours` / `reference`: the runs the value compares (for bench/results_rows.py)."""
        met = None if value is None else (value >= threshold if compare == ">=" else value <= threshold)
        self.targets.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "compare": compare,
                "met": met,
                "detail": detail,
                "ours": figure(ours),
                "reference": figure(reference),
            }
        )

    def loss_curve_target(
        self, name: str, ours: dict, reference: dict, steps: int, threshold: float, labels=("ours", "ref"), tag=""
    ) -> list[dict]:
        """Target `name`: the largest |ours - reference| / |reference| loss over the steps both runs logged (no value
        unless both logged all `steps`); notes every tenth step; returns the curve, one {step, <labels>, rel_diff}
        per common step. `labels` name the two runs in notes and curve, `tag` prefixes the notes."""
        mine, theirs = labels
        a, b = run_losses(ours), run_losses(reference)
        common = sorted(set(a) & set(b))
        gaps = relative_loss_gaps(reference, ours)
        worst = max(gaps, key=gaps.get, default=None)
        for k in common[:: max(1, len(common) // 10)] + common[-1:]:
            self.note(f"{tag}step {k}: {mine} {a[k]:.4f}  {theirs} {b[k]:.4f}  rel diff {gaps.get(k, 0):.4%}")
        complete = len(common) == steps
        detail = (
            f"worst at step {worst} of {len(common)} compared; first loss {mine} {a.get(1)} {theirs} {b.get(1)}, "
            f"last {mine} {a.get(steps)} {theirs} {b.get(steps)}"
            if worst is not None
            else "no common steps"
        ) + ("" if complete else f"; only {len(common)} of {steps} steps on both sides")
        value = gaps[worst] if worst is not None and complete else None
        self.target(name, value, threshold, compare="<=", detail=detail, ours=ours, reference=reference)
        return [{"step": k, mine: a[k], theirs: b[k], "rel_diff": gaps.get(k)} for k in common]

    @staticmethod
    def _one_line(run: dict) -> str:
        if run.get("tokens_per_s") is None:
            return run.get("status", "?")
        mfu = f", MFU {run['mfu']:.1%}" if run.get("mfu") is not None else ""
        mem = f", peak {run['max_mem_gb']:.1f} GB/GPU" if run.get("max_mem_gb") is not None else ""
        return (
            f"{run['tokens_per_s']:,.0f} tok/s ({run['tokens_per_s_per_gpu']:,.0f}/GPU){mfu}{mem}, "
            f"first step after {run.get('launch_to_first_step_s')}s, {run['status']}"
        )

    def finish(self, extra: dict | None = None, ratio_to: dict | None = None) -> dict:
        """Print the table and write the JSON. `ratio_to`: the run each row's 'x ref' column divides by
        (achieved FLOP/s per GPU, i.e. MFU: equal to the tokens/s ratio when the models are the same)."""
        for run in self.runs:
            ref = ratio_to or {}
            if ref and run is not ref:
                run["ratio_to_baseline"] = ratio(run.get("tflops_per_gpu"), ref.get("tflops_per_gpu"))
        payload = {
            "benchmark": self.name,
            "command": shlex.join(["python3", *sys.argv]),
            **self.env,
            "seq_length": self.args.seq_length,
            "args": vars(self.args),
            "elapsed_s": round(self.elapsed(), 1),
            **(extra or {}),
            "runs": self.runs,
            "targets": self.targets,
        }
        with open(self.out, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        self.print_table(ratio_to)
        print(f"JSON: {self.out}\nlog:  {self.log_path}", flush=True)
        if self._tmp and not self.args.workdir:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return payload

    def print_table(self, ref: dict | None) -> None:
        head = [
            "run",
            "layout",
            "sched",
            "mb x n",
            "prec",
            "tok/s",
            "tok/s/GPU",
            "MFU",
            "mem GB/GPU",
            "to step1 s",
            "x base",
            "status",
        ]
        rows = []
        for r in self.runs:
            lay = r["layout"]
            mem = r.get("peak_mem_gb_per_gpu")
            rows.append(
                [
                    r["label"],
                    f"pp{lay['pp']}xdp{lay['dp']}",
                    r["schedule"],
                    f"{r['micro_batch']}x{r['n_micro']}",
                    r["precision"].split()[0] + ("+c" if r.get("compile") else ""),
                    _fmt(r.get("tokens_per_s"), ",.0f"),
                    _fmt(r.get("tokens_per_s_per_gpu"), ",.0f"),
                    _fmt(r.get("mfu"), ".1%"),
                    "/".join(f"{m:.1f}" for m in mem) if mem else "-",
                    _fmt(r.get("launch_to_first_step_s"), ".1f"),
                    "ref" if r is ref else _fmt(r.get("ratio_to_baseline"), ".2f"),
                    r.get("status", "?") + (f" ({r['skipped_steps']} skipped)" if r.get("skipped_steps") else ""),
                ]
            )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        print(
            f"\n{self.name} | {self.env['card']} | torch {self.env['torch']} | transformers "
            f"{self.env['transformers']} | commit {self.env['commit'][:12]} | seq {self.args.seq_length} | "
            f"steps {self.args.steps} (first {self.args.warmup} not timed) | MFU vs {self.env['peak_label']}"
        )
        print(line(head))
        for row in rows:
            print(line(row))
        for t in self.targets:
            v = t["value"]
            shown = "n/a" if v is None else f"{v:.3f}"
            verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
            print(
                f"target {t['target']}: {shown} (need {t['compare']} {t['threshold']}) -> {verdict}"
                f"{'  [' + t['detail'] + ']' if t['detail'] else ''}"
            )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
