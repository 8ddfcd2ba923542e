"""The optimizer step alone, the way a bf16 stage takes it (#31.3): the product's StageOptimizer over the 1.4B
shape's real parameters (names, shapes, decay groups), one-pass AdamW (optimizer/one_pass.py) at several block
sizes and warp counts against the three-pass step (widen the gradients, torch's fused AdamW, round back). Each path
is timed two ways: GPU time (the launches queued behind a sleeping kernel, so the host's launch rate does not
count: what the step costs inside a training step, where the host runs ahead of the GPU) and wall time (launch to
finish, what it costs when the GPU waits for the host). Memory traffic per second is set against a plain device
copy's in the same run. One GPU.

    python bench/bench_optimizer_step.py --out $OUT/bench_optimizer_step.json
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, environment, hf_config  # noqa: E402

sys.path.insert(0, REPO)

ONE_PASS_BYTES = 2 + 4 * 3 + 4 * 3 + 2  # per parameter: read grad, master, moments; write master, moments, weight
THREE_PASS_BYTES = (2 + 4) + 4 * 7 + (4 + 2)  # widen; fused AdamW (grad, master, moments in; three out); round back


def parameters(shape, device):
    """The named bf16 parameters of `shape`'s GPT-NeoX model (transformers' names and shapes), on `device`."""
    import torch
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(hf_config(shape))
    generator = torch.Generator(device).manual_seed(0)
    return [
        (name, torch.nn.Parameter(torch.randn(p.shape, generator=generator, device=device).to(torch.bfloat16) * 0.02))
        for name, p in model.named_parameters()
    ]


def timings(opt, params, grads, repeats):
    """(GPU ms of each, wall ms of each) of `repeats` timed steps, taken in turn: half on each clock."""
    import torch

    gpu, wall = [], []
    for k in range(repeats + 2):  # two untimed: the first builds the state (and the kernel)
        for (_, p), g in zip(params, grads):
            p.grad = g
        torch.cuda.synchronize()
        if k % 2:  # GPU time: the host queues the whole step while the GPU sleeps
            torch.cuda._sleep(200_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            if k >= 2:
                gpu.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            if k >= 2:
                wall.append((time.perf_counter() - begin) * 1e3)
    return gpu, wall


def copy_bandwidth(numel):
    """Bytes per second of a plain device copy of `numel` fp32 elements (read + write), the attainable peak."""
    import torch

    src = torch.empty(numel, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 8 * numel * 10 / (start.elapsed_time(end) / 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="pythia-1.4b")
    ap.add_argument("--blocks", default="1024,2048,4096,8192")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per configuration, half on each clock")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from comm import Layout
    from config import OptimizerConfig
    from optimizer import StageOptimizer, one_pass

    env = environment(smoke=False)
    device = torch.device("cuda")
    params = parameters(args.shape, device)
    numel = sum(p.numel() for _, p in params)
    grads = [torch.randn_like(p) * 1e-3 for _, p in params]
    layout = Layout(0, 1, 1, 1, 0, 0, 0, device)
    results = {**env, "benchmark": "bench_optimizer_step", "shape": args.shape, "params": numel}
    results["tensors"] = len(params)
    results["copy_bytes_per_s"] = copy_bandwidth(256 * 2**20)
    rows = []

    def measure(label, block=None, warps=None):
        opt = StageOptimizer(params, OptimizerConfig(lr=1e-5), layout, 10**6, backwards_per_step=1)
        assert opt.one_pass, "the one-pass step does not run here"
        opt.one_pass = block is not None
        if block is not None:
            one_pass.BLOCK, one_pass.NUM_WARPS = block, warps
        gpu, wall = timings(opt, params, grads, args.repeats)
        traffic = (ONE_PASS_BYTES if block is not None else THREE_PASS_BYTES) * numel
        row = {
            "path": label,
            "block": block,
            "warps": warps,
            "gpu_ms": statistics.median(gpu),
            "gpu_ms_all": gpu,
            "wall_ms": statistics.median(wall),
            "wall_ms_all": wall,
        }
        row["bytes_per_s"] = traffic / (row["gpu_ms"] / 1e3)
        row["share_of_copy_bandwidth"] = row["bytes_per_s"] / results["copy_bytes_per_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
        del opt
        torch.cuda.empty_cache()

    measure("three-pass")
    for block in (int(b) for b in args.blocks.split(",")):
        for warps in (int(w) for w in args.warps.split(",")):
            measure("one-pass", block, warps)
    measure("three-pass")
    results["rows"] = rows
    best = min((r for r in rows if r["block"]), key=lambda r: r["gpu_ms"])
    three = min(r["gpu_ms"] for r in rows if not r["block"])
    results["best_one_pass"] = {"block": best["block"], "warps": best["warps"], "gpu_ms": best["gpu_ms"]}
    results["three_pass_gpu_ms"] = three
    results["one_pass_over_three_pass_gpu"] = best["gpu_ms"] / three
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
