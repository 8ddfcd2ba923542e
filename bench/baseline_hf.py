"""BASELINE for every benchmark: a plain transformers training loop on one device.

AutoModelForCausalLM (GPT-NeoX, Llama, Qwen2/3 or Gemma 3 shapes) built from the model directory's config.json (random init, directly on
the device), fp32 parameters, bf16 autocast, attn_implementation="sdpa", torch.optim.AdamW(fused=True), `--accum` micro-batches of
`--micro-batch-size` random-token sequences per optimizer step (loss = transformers' own shifted cross-entropy).
This is GUIDE §6's measured configuration (Pythia-1.4B shape, micro-batch 4: 40,970 tok/s on one H100).
No gradient clipping, no data loader. On CPU (--device cpu, the --smoke runs): fp32, no autocast, unfused AdamW.

LoRA (issue 14's reference; bench_lora.py): `--lora-r R --lora-alpha A --lora-targets LIST|all-linear` wraps the model
in peft's LoraConfig (dropout 0); `--base-dtype bf16` holds the frozen base in bf16 while peft keeps the adapters in
fp32 (get_peft_model's autocast_adapter_dtype); bf16 autocast and SDPA as above; fused AdamW on the adapters only.
`--gradient-checkpointing`: transformers' gradient_checkpointing_enable(use_reentrant=False). `--liger`: liger-kernel's
kernels for the model type, patched in before the model is built (with the random-token loss, its fused linear
cross-entropy: no logits of the whole window).
`--quantize nf4` (QLoRA): every linear of the transformer layers (not the LM head, as transformers' bitsandbytes
quantizer skips it) in bitsandbytes Linear4bit, NF4, double quantisation, bf16 compute. With `--load-weights` through
from_pretrained(quantization_config=BitsAndBytesConfig(...)) as users do; without, the random bf16 model is built on
the GPU and each linear is quantised in place (Params4bit moved to the GPU, as transformers' quantizer does per
tensor), which skips writing and reading 41 GB for a 20B shape; the summary's `quantized_by` says which. peft's
prepare_model_for_kbit_training is not called (it would cast the embedding, norms and head to fp32).
With LoRA the peak memory is counted from the first step (after the model is built / quantised).
`--init-adapters-seed S` starts the adapters from this project's seeded init (modules.init_lora_weights, the adapters
our trainer starts from with --seed S, rounded to --base-dtype as ours are), so both sides start alike.
`--data FILE --tokenizer DIR`: batches of tasks.PackedStream (seed --data-seed, the trainer's order) instead of random
tokens, loss = cross-entropy summed over label tokens / their count (the trainer's); with --max-grad-norm,
--linear-schedule and --lr this is the trainer's optimizer step (AdamW betas 0.9/0.999, eps 1e-6, weight decay 0.01).

Writes one JSON line per step to --metrics-file (step, loss, step_s, mem_gb, launch_to_first_step_s on step 1), the
same keys as the trainer's metrics file, and a summary JSON to --out (device name, peak memory, or an error).

    python bench/baseline_hf.py --model-dir DIR --seq-length 2048 --micro-batch-size 4 --accum 2 --steps 20 \
        --out /tmp/b.json --metrics-file /tmp/b.jsonl
"""

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # modules, tasks (LoRA init, data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="directory with a GPT-NeoX config.json")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    ap.add_argument(
        "--liger",
        action="store_true",
        help="liger-kernel's kernels for the model type (its fused linear cross-entropy)",
    )
    ap.add_argument("--load-weights", action="store_true", help="from_pretrained(--model-dir) instead of random init")
    ap.add_argument("--base-dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the model's parameters")
    ap.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default="adamw",
        help="adamw8bit: bitsandbytes' AdamW8bit (HF Trainer's optim=adamw_bnb_8bit) instead of torch's fused AdamW",
    )
    lora = ap.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora-r", type=int, default=0, help="peft LoRA rank (0: train every weight, the default)")
    lora.add_argument("--lora-alpha", type=float, default=16)
    lora.add_argument("--lora-targets", default=None, help="comma list or all-linear (default: peft's for GPT-NeoX)")
    lora.add_argument("--gradient-checkpointing", action="store_true")
    lora.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA base (bitsandbytes)")
    lora.add_argument("--init-adapters-seed", type=int, default=None, help="this project's adapter init, seed S")
    data = ap.add_argument_group("data (loss curves)")
    data.add_argument("--data", default=None, help="jsonl through tasks.PackedStream instead of random tokens")
    data.add_argument("--tokenizer", default=None, help="tokenizer directory for --data (default: --model-dir)")
    data.add_argument("--data-seed", type=int, default=42)
    data.add_argument("--lr", type=float, default=1e-5)
    data.add_argument("--max-grad-norm", type=float, default=0.0, help="global clipping (0: none)")
    data.add_argument("--linear-schedule", action="store_true", help="lr decays linearly to 0 over --steps")
    ap.add_argument("--out", required=True, help="summary JSON")
    ap.add_argument("--metrics-file", required=True, help="per-step JSON lines")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    summary = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    metrics = open(args.metrics_file, "w")
    stream = None
    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        if args.liger:  # patches transformers' classes: before the model is built
            from liger_kernel.transformers import _apply_liger_kernel

            _apply_liger_kernel(config.model_type)
            summary["liger"] = True
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
        if args.quantize != "none":
            model = build_quantized(args, config, device, summary)
        elif args.load_weights:
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=dtype)
            model = model.to(device)
        else:
            with torch.device(device):  # init on the GPU: building a 1-7B model on the CPU takes minutes
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = list(model.parameters())
        if args.lora_r > 0:
            model, params = add_lora(args, model, summary)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        model.train()
        if args.compile:
            model = torch.compile(model)
        if args.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
        else:
            optimizer = torch.optim.AdamW(
                params, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, fused=True if cuda else None
            )
        schedule = None
        if args.linear_schedule:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / args.steps))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        shape = (args.micro_batch_size, args.seq_length)
        if args.data:
            from transformers import AutoTokenizer

            import tasks
            from config import DataConfig

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_dir)
            batch = args.micro_batch_size * args.accum
            data = DataConfig(task_spec=args.data, seq_length=args.seq_length, batch_size=batch, seed=args.data_seed)
            stream = tasks.PackedStream(data, tokenizer)
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            if stream is None:
                for _ in range(args.accum):
                    ids = torch.randint(0, config.vocab_size, shape, device=device)
                    with autocast:
                        loss = model(input_ids=ids, labels=ids).loss
                    (loss / args.accum).backward()
                loss_value = loss.item()  # waits for the step, as the trainer's logging does
            else:  # the trainer's loss: summed over the step's label tokens / their count
                batch = next(stream)
                labels_all = batch["labels"].to(device)
                count = (labels_all != -100).sum()
                total = torch.zeros((), device=device)
                for ids, labels in zip(batch["input_ids"].to(device).chunk(args.accum), labels_all.chunk(args.accum)):
                    with autocast:
                        logits = model(input_ids=ids).logits
                    loss = (
                        F.cross_entropy(
                            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
                        )
                        / count
                    )
                    loss.backward()
                    total += loss.detach()
                loss_value = total.item()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            record = {"step": step, "loss": loss_value, "step_s": time.perf_counter() - t0}
            if cuda:
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                record["mem_gb_per_rank"] = [round(record["mem_gb"], 2)]
            if step == 1:
                record["launch_to_first_step_s"] = time.time() - PROCESS_START
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
    except torch.cuda.OutOfMemoryError as exc:
        summary["error"] = f"OOM: {str(exc).splitlines()[0]}"
    if cuda:
        summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if stream is not None:
        stream.close()
    metrics.close()
    with open(args.out, "w") as f:
        json.dump(summary, f)
    print(json.dumps(summary), flush=True)
    return 3 if "error" in summary else 0


def add_lora(args, model, summary):
    """peft LoRA (dropout 0) on `model`; returns (peft model, its trainable parameters)."""
    import peft
    import torch

    targets = args.lora_targets
    start = None
    if args.init_adapters_seed is not None:
        start, targets = our_initial_adapters(args, targets)
    if targets is None:
        target_modules = None  # peft's default for GPT-NeoX: query_key_value
    elif targets == "all-linear":
        target_modules = "all-linear"  # peft: every linear except the output layer
    else:
        target_modules = [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=target_modules, bias="none"
    )
    model = peft.get_peft_model(model, config)  # adapters in fp32 even on a bf16 base (autocast_adapter_dtype)
    named = {
        name.removeprefix("base_model.model.").replace(".default.weight", ".weight"): p
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    if start is not None:
        if set(named) != set(start):
            raise SystemExit(f"baseline_hf: peft's adapters {sorted(named)[:4]}... are not ours {sorted(start)[:4]}...")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(start[name])
    summary["trainable_params"] = sum(p.numel() for p in named.values())
    summary["adapter_dtype"] = str(next(iter(named.values())).dtype)
    summary["lora_targets"] = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in named})
    return model, list(named.values())


def our_initial_adapters(args, targets):
    """{our adapter name: fp32 tensor} as our trainer starts them with --seed S (modules.init_lora_weights), rounded
    to --base-dtype (our adapters live in the model's dtype, their fp32 master copies start from those values); and
    the resolved target list. Drawn on a meta-device stage: nothing model-sized is allocated."""
    import torch

    import modules
    from modules.lora import LoraLinear

    cfg = modules.load_model_config(args.model_dir)
    lora = modules.make_lora_config(cfg, args.lora_r, args.lora_alpha, 0.0, targets)
    with torch.device("meta"):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
        modules.apply_lora(stage, lora, seed=None)
    for m in stage.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.to_empty(device="cpu")
            m.lora_B.to_empty(device="cpu")
    modules.init_lora_weights(stage, args.init_adapters_seed)
    dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    start = {n: p.detach().to(dtype).float() for n, p in modules.lora_parameters(stage).items()}
    return start, ",".join(lora.target_modules)


def build_quantized(args, config, device, summary):
    """The model with every linear of its transformer layers in bitsandbytes NF4 (double quantisation, bf16
    compute); the LM head and embeddings stay bf16."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if args.load_weights:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        summary["quantized_by"] = "from_pretrained(quantization_config=BitsAndBytesConfig nf4, double quant, bf16)"
        return AutoModelForCausalLM.from_pretrained(
            args.model_dir,
            attn_implementation="sdpa",
            dtype=torch.bfloat16,
            quantization_config=quant,
            device_map={"": device},
        )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.base_model.layers:
            for path, linear in list(layer.named_modules()):
                if type(linear) is not nn.Linear:
                    continue
                with torch.device("meta"):
                    q = bnb.nn.Linear4bit(
                        linear.in_features,
                        linear.out_features,
                        bias=linear.bias is not None,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                    )
                q.weight = bnb.nn.Params4bit(
                    linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                if linear.bias is not None:
                    q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
                q = q.to(device)  # quantises here
                parent, _, attr = path.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr, q)
                del linear
    model.is_loaded_in_4bit = True  # what transformers' quantizer sets; peft then wraps Linear4bit layers
    summary["quantized_by"] = "in place: bf16 model built on the device, each layer linear -> bnb Linear4bit nf4"
    return model


if __name__ == "__main__":
    raise SystemExit(main())
