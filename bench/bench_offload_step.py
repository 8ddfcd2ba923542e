"""Issue 15: the cost of one --offload-optimizer cpu update per parameter, on this machine's host.

StageOptimizer.step() on N bf16 parameters (GPT-NeoX-sized matrices, gradients already on the device) with the
fp32 masters and AdamW state on the host (optimizer/offload.py: 16-bit gradients device -> pinned host buffers on a
side stream, widened to fp32, fused CPU AdamW, rounded to bf16, host -> device, chunk by chunk, overlapped), against
the same optimizer on the device in the same call. Reported per step: seconds, seconds per billion parameters, the
part of it the host waited for copies, and an estimate of the host's memory traffic in GB/s (40 bytes per element:
AdamW reads gradient, master and two moments and writes the last three in fp32, plus widening and rounding). The
update costs the same whatever the batch, so a trainer step of T seconds without offload becomes about
T + optimizer_s with it.

  python bench/bench_offload_step.py                       # 1 GPU, 1e9 parameters, about a minute
  python bench/bench_offload_step.py --threads 4,8,16      # the same at several host thread counts
  python bench/bench_offload_step.py --smoke               # CPU, 4e6 parameters (both sides on the host)
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, environment, ratio  # noqa: E402

HOST_BYTES_PER_ELEMENT = 40  # fp32: AdamW 4 reads + 3 writes = 28, widening 2 + 4, rounding 4 + 2


def make_params(n, device, dtype, hidden=4096):
    """~n parameters as [4h, h] matrices (the MLP's), the remainder as one vector; and a gradient for each."""
    import torch

    shapes = [(4 * hidden, hidden)] * (n // (4 * hidden * hidden))
    rest = n - sum(a * b for a, b in shapes)
    shapes += [(rest,)] if rest else []
    gen = torch.Generator(device=device).manual_seed(0)
    kw = {"device": device, "dtype": dtype}
    params, grads = [], []
    for i, shape in enumerate(shapes):
        params.append((f"layers.{i}.weight", torch.nn.Parameter(torch.randn(shape, generator=gen, **kw) * 0.02)))
        grads.append(torch.randn(shape, generator=gen, **kw) * 1e-3)
    return params, grads


def time_steps(optimizer, params, grads, repeats, sync):
    """Seconds of each of `repeats` optimizer steps after one untimed step (state allocation, pinned pages), and
    the optimizer's (host update, copy wait) seconds of each."""
    times, host = [], []
    for k in range(repeats + 1):
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        sync()
        t = time.perf_counter()
        optimizer.step()
        sync()
        if k:
            times.append(time.perf_counter() - t)
            host.append(optimizer.host_seconds)
    return times, host


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, 4e6 parameters: checks the script end to end")
    ap.add_argument("--params", type=float, default=1e9, help="parameters stepped (default 1e9)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per setting")
    ap.add_argument("--threads", default="", help="comma list of host thread counts (default: the trainer's choice)")
    ap.add_argument("--out", default=None, help="JSON result (default: $OUT/bench_offload_step.json)")
    args = ap.parse_args()
    import torch

    from comm import Layout
    from config import OptimizerConfig
    from optimizer import StageOptimizer

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        sys.exit("bench_offload_step: torch sees no GPU here; use --smoke for the CPU check")
    n = int(4e6 if args.smoke and args.params == ap.get_default("params") else args.params)
    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    cfg = OptimizerConfig(kind="adamw", lr_scheduler="constant")  # the flags' defaults otherwise
    layout = Layout(0, 1, 1, 1, 0, 0, 0, device)
    env = environment(args.smoke)
    params, grads = make_params(n, device, torch.bfloat16)
    print(f"== bench_offload_step: {n:,} bf16 parameters on {device}, host cores {os.cpu_count()}", flush=True)

    device_times, _ = time_steps(
        StageOptimizer(params, cfg, layout, 100, backwards_per_step=1), params, grads, args.repeats, sync
    )
    reference = {"label": "device optimizer", "step_s": min(device_times), "step_s_all": device_times}
    print(f"device optimizer: {reference['step_s']:.3f} s per step", flush=True)

    runs = []
    offload_cfg = dataclasses.replace(cfg, offload="cpu")
    for threads in [int(t) for t in args.threads.split(",") if t] or [None]:
        # sets the trainer's thread count on a GPU
        optimizer = StageOptimizer(params, offload_cfg, layout, 100, backwards_per_step=1)
        if threads:
            torch.set_num_threads(threads)
        times, host = time_steps(optimizer, params, grads, args.repeats, sync)
        best = min(range(len(times)), key=times.__getitem__)
        run = {
            "label": f"offload, {torch.get_num_threads()} host threads",
            "threads": torch.get_num_threads(),
            "step_s": times[best],
            "step_s_all": times,
            "host_wait_s": host[best][1],
            "s_per_billion_params": times[best] / (n / 1e9),
            "host_gb_per_s_estimate": HOST_BYTES_PER_ELEMENT * n / times[best] / 1e9,
            "x_device_step": ratio(times[best], reference["step_s"]),
            "chunks": len(optimizer.grad_chunks),
        }
        runs.append(run)
        print(
            f"{run['label']}: {run['step_s']:.3f} s per step ({run['s_per_billion_params']:.2f} s per 1e9 params, "
            f"~{run['host_gb_per_s_estimate']:.0f} GB/s host traffic, waiting for copies {run['host_wait_s']:.3f} s; "
            f"{run['x_device_step']:.1f}x the device step)",
            flush=True,
        )
        del optimizer
    out = args.out or os.path.join(
        os.environ.get("OUT") or os.path.join(REPO, "runs", "bench"), "bench_offload_step.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    payload = {
        "benchmark": "bench_offload_step",
        "command": " ".join(["python3", *sys.argv]),
        **env,
        "params": n,
        "dtype": "bfloat16",
        "host_bytes_per_element": HOST_BYTES_PER_ELEMENT,
        "reference": reference,
        "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"JSON: {out}", flush=True)


if __name__ == "__main__":
    main()
