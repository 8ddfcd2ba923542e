"""BASELINE for every benchmark: a plain transformers training loop on one device.

GPTNeoXForCausalLM built from the model directory's config.json (random init, directly on the device), fp32
parameters, bf16 autocast, attn_implementation="sdpa", torch.optim.AdamW(fused=True), `--accum` micro-batches of
`--micro-batch-size` random-token sequences per optimizer step (loss = transformers' own shifted cross-entropy).
This is GUIDE §6's measured configuration (Pythia-1.4B shape, micro-batch 4: 40,970 tok/s on one H100).
No gradient clipping, no data loader. On CPU (--device cpu, the --smoke runs): fp32, no autocast, unfused AdamW.

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="directory with a GPT-NeoX config.json")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    ap.add_argument("--out", required=True, help="summary JSON")
    ap.add_argument("--metrics-file", required=True, help="per-step JSON lines")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    summary = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    metrics = open(args.metrics_file, "w")
    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        torch.manual_seed(0)
        with torch.device(device):  # init on the GPU: building a 1-7B model on the CPU takes minutes
            model = GPTNeoXForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        model.train()
        if args.compile:
            model = torch.compile(model)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, fused=True if cuda else None
        )
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        shape = (args.micro_batch_size, args.seq_length)
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            for _ in range(args.accum):
                ids = torch.randint(0, config.vocab_size, shape, device=device)
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                (loss / args.accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()  # waits for the step, as the trainer's logging does
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
    metrics.close()
    with open(args.out, "w") as f:
        json.dump(summary, f)
    print(json.dumps(summary), flush=True)
    return 3 if "error" in summary else 0


if __name__ == "__main__":
    raise SystemExit(main())
