"""BASELINE for bench_dpo.py: TRL's DPOTrainer + peft LoRA on one device, timed per optimizer step.

The model is AutoModelForCausalLM built from the model directory's config.json (random init, directly on the device,
seed 0, attn_implementation="sdpa"), with bf16 weights on the GPU (fp32 on the CPU), as bench_lora's peft baseline
(baseline_hf.py --base-dtype bf16). TRL wraps it in peft itself (`peft_config=LoraConfig(r, alpha, dropout 0,
target_modules="all-linear")`; peft keeps the adapters in fp32) and, with peft and no `ref_model`, computes the
reference log-probabilities with the adapters switched off, as our trainer's `--dpo-reference adapters` does.

DPOConfig: per_device_train_batch_size = --micro-batch-size pairs, gradient_accumulation_steps = --accum,
max_steps = --steps, max_length = --seq-length, beta, learning_rate 1e-5 (linear decay, no warmup, as ours),
bf16=True on the GPU (accelerate's bf16 autocast; False on the CPU), optim adamw_torch_fused (adamw_torch on the CPU),
TRL's other defaults (max_grad_norm 1.0, weight decay 0, loss_type sigmoid), precompute_ref_log_probs False,
gradient_checkpointing as --gradient-checkpointing says (TRL's default is on: it is set explicitly, use_reentrant
False), torch_compile as --compile says (transformers/accelerate compile the whole model; --regional-compile: accelerate's
per-block compilation, ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1), logging, saving and evaluation off,
report_to none. The data: --data, a jsonl of standard records {"prompt", "chosen", "rejected"} (plain text; TRL
appends EOS to the completions and tokenises them itself), read into a datasets.Dataset.

Timing: a TrainerCallback synchronises the GPU at on_step_begin and on_step_end. `step_s` is the wall time from the
previous step's end to this step's end (step 1: from on_train_begin), so it holds what the trainer does between steps
too (fetching and collating the next micro-batches), as our trainer's `step_s` does; `in_step_s` is on_step_begin ->
on_step_end alone (Trainer fetches a step's batches before on_step_begin). The loss of a step is the mean of its
micro-batches' DPO losses (each the mean over its pairs), read once the step is synchronised. Peak memory:
torch.cuda.max_memory_allocated, counted from on_train_begin (after the model is built and wrapped).

Writes one JSON line per step to --metrics-file (step, loss, step_s, in_step_s, mem_gb, mem_gb_per_rank,
launch_to_first_step_s on step 1), the keys bench/common.py's Session reads, and a summary JSON to --out
(device_name, peak_mem_gb, trainable_params, adapter_dtype, info: versions and settings; error on OOM).

Needs trl (1.16), peft, datasets (+ pyarrow, pandas, dill, multiprocess, xxhash), accelerate; see bench_dpo.py for the
wheels that carry them to the GPU machine.

    python bench/baseline_dpo_trl.py --model-dir DIR --data pairs.jsonl --seq-length 1024 --micro-batch-size 4 \
        --accum 2 --steps 20 --out /tmp/t.json --metrics-file /tmp/t.jsonl
"""

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="directory with a config.json and the tokenizer files")
    ap.add_argument("--data", required=True, help="jsonl of {prompt, chosen, rejected} text records")
    ap.add_argument("--seq-length", type=int, default=1024, help="DPOConfig.max_length (prompt + completion)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--compile", action="store_true", help="DPOConfig(torch_compile=True): the whole model")
    ap.add_argument("--regional-compile", action="store_true", help="with --compile: accelerate's per-block compile")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", required=True, help="summary JSON")
    ap.add_argument("--metrics-file", required=True, help="per-step JSON lines")
    args = ap.parse_args()
    if args.regional_compile:
        args.compile = True
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"  # read by accelerate's TorchDynamoPlugin

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_site_packages()
    import accelerate
    import datasets
    import peft
    import trl

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    summary: dict = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    summary["info"] = {
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "torch_compile": "regional (per block)" if args.regional_compile else ("whole model" if args.compile else None),
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    metrics = open(args.metrics_file, "w")
    try:
        with open(args.data) as f:
            records = [json.loads(line) for line in f if line.strip()]
        pairs_needed = args.micro_batch_size * args.accum * args.steps
        if len(records) < pairs_needed:
            raise SystemExit(f"baseline_dpo_trl: {args.data} holds {len(records)} pairs, {pairs_needed} needed")
        dataset = datasets.Dataset.from_list(records[:pairs_needed])
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        config = AutoConfig.from_pretrained(args.model_dir)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if cuda else torch.float32
        with torch.device(device):  # init on the GPU: building a 1-8B model on the CPU takes minutes
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        targets = args.lora_targets
        lora = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules="all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            task_type="CAUSAL_LM",
        )
        dpo_config = trl.DPOConfig(
            output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_output"),
            per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.accum,
            max_steps=args.steps,
            max_length=args.seq_length,
            beta=args.beta,
            learning_rate=args.lr,
            warmup_steps=0,
            bf16=cuda,
            fp16=False,
            use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
            torch_compile=args.compile,
            precompute_ref_log_probs=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        timer = make_step_timer(torch, device if cuda else None, metrics)
        trainer = trl.DPOTrainer(
            model=model,
            args=dpo_config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        summary["trainable_params"] = sum(p.numel() for p in trainable)
        summary["adapter_dtype"] = str(trainable[0].dtype) if trainable else None
        lengths = {len(r) for name in ("prompt_ids", "chosen_ids", "rejected_ids") for r in trainer.train_dataset[name]}
        summary["info"]["token_lengths"] = sorted(lengths)  # prompt and completion (EOS included) lengths seen
        compute_loss = trainer.compute_loss

        def compute_loss_kept(*a, **k):  # keep each micro-batch's loss (a device tensor) for the step record
            out = compute_loss(*a, **k)
            timer.losses.append((out[0] if isinstance(out, tuple) else out).detach().float())
            return out

        trainer.compute_loss = compute_loss_kept
        trainer.train()
    except torch.cuda.OutOfMemoryError as exc:
        summary["error"] = f"OOM: {str(exc).splitlines()[0]}"
    if cuda:
        summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    metrics.close()
    with open(args.out, "w") as f:
        json.dump(summary, f)
    print(json.dumps(summary), flush=True)
    return 3 if "error" in summary else 0


def check_site_packages():
    """datasets fingerprints a Dataset with dill, which pickles a module by reference only when it lives under the
    interpreter's prefix or in a folder named site-packages: pyarrow installed elsewhere (pip --target /tmp/site) is
    pickled by value and fails on its MonthDayNano type. Stop with the fix instead."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec("pyarrow")
    where = spec.origin if spec and spec.origin else ""
    prefixes = {os.path.realpath(getattr(sys, n)) for n in ("prefix", "base_prefix", "exec_prefix") if hasattr(sys, n)}
    if where and "site-packages" not in where and not any(os.path.realpath(where).startswith(p) for p in prefixes):
        raise SystemExit(
            f"baseline_dpo_trl: pyarrow is imported from {os.path.dirname(where)}, outside any site-packages folder, "
            f"where datasets' fingerprinting (dill) fails on it; install the wheels with --target /tmp/site-packages "
            f"and PYTHONPATH=/tmp/site-packages (bench_dpo.py's docstring)"
        )


def make_step_timer(torch, device, metrics):
    """The TrainerCallback that times each optimizer step and writes its metrics line."""
    from transformers import TrainerCallback

    def sync():
        if device is not None:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    class _StepTimer(TrainerCallback):
        def __init__(self):
            self.losses: list = []
            self.last_end = self.begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            if device is not None:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            self.last_end = sync()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = sync()

        def on_step_end(self, args, state, control, **kwargs):
            now = sync()
            losses, self.losses = self.losses, []
            record = {
                "step": state.global_step,
                "loss": float(torch.stack(losses).mean()) if losses else None,
                "step_s": now - self.last_end,
                "in_step_s": now - self.begin,
            }
            if device is not None:
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                record["mem_gb_per_rank"] = [round(record["mem_gb"], 2)]
            if state.global_step == 1:
                record["launch_to_first_step_s"] = time.time() - PROCESS_START
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            self.last_end = now

    return _StepTimer()


if __name__ == "__main__":
    raise SystemExit(main())
