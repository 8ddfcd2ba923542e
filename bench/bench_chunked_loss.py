"""Issue #29 item 1: the loss path alone (LM head + cross-entropy, forward and backward) of one micro-batch's hidden
states, bf16 like a --bf16 last stage: the plain head + fp32 cross-entropy (eager, and torch.compile'd as a whole),
ours (--chunked-loss: training/chunked_logps.py, eager and with its chunk kernels compiled; the token loss, whose
gradients are computed in the forward, and the preference objectives' log-probabilities, recomputed in the
backward: "ours logps"), liger-kernel's
LigerFusedLinearCrossEntropyLoss and cut-cross-entropy's linear_cross_entropy (each where it imports).

For each shape (tokens x hidden -> vocabulary): milliseconds per forward + backward (median of --repeats after
warm-up, GPU synchronised), and the loss path's peak memory: max_memory_allocated during the step minus what was
allocated before it (the hidden states, the head weight and its gradient buffer are allocated beforehand, so this
is what the loss itself needs: logits, softmax, chunks). Every variant's loss and gradients are checked against the
plain eager ones (relative error of the loss, max relative error of the hidden-state and weight gradients).

  target 29.1: at the Llama-3 vocabulary (128,256, hidden 4,096) and 16k tokens: peak memory of ours >= 4x lower
  than the plain loss's, step time >= 0.98x the plain loss's best (eager or compiled).

The other shapes place `--chunked-loss auto` (on once a micro-batch's fp32 logits exceed 1 GiB): its rule should
never turn on where the chunks are slower.

Device (`kind` nvidia-h100-x1; liger/CCE need their wheels in `.whl/`, `python bench/bench_chunked_loss.py
--download-wheels`): python3 bench/bench_chunked_loss.py     (~2-3 min, estimate)
    python bench/bench_chunked_loss.py --smoke        # CPU: tiny shapes, eager variants, the checks
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [  # (label, tokens, hidden, vocab, softcap)
    ("pythia-1.4b 4k", 4096, 2048, 50_304, None),
    ("pythia-1.4b 16k", 16384, 2048, 50_304, None),
    ("llama-3 2k", 2048, 4096, 128_256, None),
    ("llama-3 4k", 4096, 4096, 128_256, None),
    ("llama-3 16k", 16384, 4096, 128_256, None),
    ("qwen3-8b 8k", 8192, 4096, 151_936, None),
    ("gemma-2 8k soft-cap", 8192, 3584, 256_000, 30.0),
]
SMOKE_SHAPES = [("tiny", 96, 32, 1000, None), ("tiny soft-cap", 96, 32, 1000, 30.0)]
WHEELS = ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]


def loss_variants(head, softcap, cuda: bool, chunks: list[int]) -> dict:
    """name -> fn(hidden [N, H], labels [N]) -> summed cross-entropy (fp32 scalar) through `head` (Linear V x H).
    `chunks`: tokens per chunk of extra compiled variants of ours (the default chunk is always measured)."""
    import torch
    import torch.nn.functional as F

    from training.chunked_logps import ChunkedHead

    def plain(hidden, labels):
        logits = head(hidden)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")

    def ours(compiled, chunk=None):  # the token loss as training/loss.py calls it: gradients computed in the forward
        chunked = ChunkedHead(head, softcap, chunk=chunk, compiled=compiled)
        return lambda hidden, labels: chunked.token_loss(hidden, labels, 1.0)

    def ours_logps(compiled):  # the preference objectives' path: log-probabilities, chunks recomputed in backward
        chunked = ChunkedHead(head, softcap, compiled=compiled)
        return lambda hidden, labels: -chunked.token_logps(hidden, labels).sum()

    out = {"plain eager": plain, "ours eager": ours(False), "ours logps eager": ours_logps(False)}
    if cuda:
        out["plain compiled"] = torch.compile(plain)
        out["ours compiled"] = ours(True)
        out["ours logps compiled"] = ours_logps(True)
        for chunk in chunks:
            out[f"ours compiled, chunk {chunk}"] = ours(True, chunk)
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
            out["liger"] = lambda hidden, labels: liger(head.weight, hidden, labels)
        except ImportError as e:
            print(f"liger-kernel not importable ({e}); skipped", flush=True)
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cce"] = lambda hidden, labels: linear_cross_entropy(
                hidden, head.weight, labels, reduction="sum", softcap=softcap
            )
        except ImportError as e:
            print(f"cut-cross-entropy not importable ({e}); skipped", flush=True)
    return out


def measure(fn, hidden, weight, labels, repeats: int, cuda: bool) -> dict:
    """`fn(hidden, labels)`'s median forward + backward milliseconds, its peak memory beyond what was allocated
    before, and (loss, hidden gradient, weight gradient) for the checks."""
    import torch

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, labels)
        loss.backward()
        return loss

    for _ in range(2):  # warm-up (compiles)
        step()
    if cuda:
        torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    peak_gb = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    grads = (loss.detach().double(), hidden.grad.double(), weight.grad.double())
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "peak_gb": peak_gb, "result": grads}


def relative_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shapes", default=None, help="comma list of shape labels (default: all)")
    ap.add_argument("--ours-chunks", default="", help="comma list: also ours compiled at these tokens per chunk")
    ap.add_argument("--out", default=None, help="JSON (default: $OUT/bench_chunked_loss.json or runs/bench/)")
    ap.add_argument("--download-wheels", nargs="?", const=".whl", default=None, metavar="DIR")
    args = ap.parse_args()
    if args.download_wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", args.download_wheels]
        subprocess.run(cmd + WHEELS, check=True)
        return

    import torch
    from common import environment

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    env = environment(args.smoke)
    rows = []
    for label, tokens, hidden_size, vocab, softcap in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = (torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=gen)).requires_grad_()
        head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            head.weight.normal_(0, 0.02, generator=gen)
        weight = head.weight
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
        labels[: tokens // 8] = -100  # a prompt's worth of masked labels
        reference = None
        chunks = [int(c) for c in args.ours_chunks.split(",") if c.strip()]
        for name, fn in loss_variants(head, softcap, cuda, chunks).items():
            row = {"shape": label, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "softcap": softcap}
            row["variant"] = name
            try:
                result = measure(fn, hidden, weight, labels, args.repeats, cuda)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            got = result.pop("result")
            reference = reference or got
            row.update(result)
            row["loss_rel_err"], row["grad_hidden_rel_err"], row["grad_weight_rel_err"] = (
                relative_error(g, r) for g, r in zip(got, reference)
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
        del hidden, head, weight, labels
    targets = []
    by = {(r["shape"], r["variant"]): r for r in rows if "ms" in r}
    for label, *_ in shapes:
        plain = [by.get((label, v)) for v in ("plain eager", "plain compiled")]
        plain = [r for r in plain if r]
        mine = [r for (shape, variant), r in by.items() if shape == label and variant.startswith("ours ")]
        mine = [r for r in mine if "logps" not in r["variant"]]
        if not plain or not mine:
            continue
        fastest_plain = min(plain, key=lambda r: r["ms"])
        best = min(mine, key=lambda r: r["ms"])
        entry = {
            "shape": label,
            "ours": best["variant"],
            "plain": fastest_plain["variant"],
            "speed_ratio": fastest_plain["ms"] / best["ms"],
        }
        if best["peak_gb"]:
            entry["memory_ratio"] = min(r["peak_gb"] for r in plain) / best["peak_gb"]
        targets.append(entry)
        print(json.dumps(entry), flush=True)
    out = args.out or os.path.join(os.environ.get("OUT") or "runs/bench", "bench_chunked_loss.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"env": env, "rows": rows, "summary": targets}, f, indent=1)
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
