"""Attention alone, forward + backward, the way a stage runs it: SDPA causal over the whole window against the
document mask of --attention-mask document, at several mean document lengths: varlen flash attention (what a
half-precision stage runs under --masked-attention varlen, modules.varlen.VarlenMask over the lengths counted on the
host, its backward deterministic), torch's own `varlen_attn` (the same kernels, the backward in a run-dependent
order) and FlexAttention (a block mask built once, compiled flex_attention: the default); each mask's build time;
and whether five backward passes give bit-identical query gradients on each varlen path. One GPU.

    python bench/bench_attention.py --out results.json      # B8 H16 S2048 D128, bf16
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doc_ids_of(batch, seq, mean_len, generator):
    """Document ids of packed windows whose documents average `mean_len` tokens (lengths uniform in 1..2·mean)."""
    import torch

    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = int(torch.randint(1, 2 * mean_len, (1,), generator=generator))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def timed(fn, repeats):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--doc-lengths", default="256,512,2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from modules.layers import causal_attention, document_mask
    from modules.varlen import VarlenMask
    from tasks.packing import document_lengths

    device = torch.device("cuda")
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(args.batch, args.seq, args.heads * args.head_dim, device=device, dtype=torch.bfloat16)

    def step(mask):
        out = causal_attention(q, k, v, mask)
        out.backward(grad)

    def torch_varlen_step(mask):
        from torch.nn.attention.varlen import varlen_attn

        b, h, s, d = shape
        cu = mask.cu_seqlens
        out = varlen_attn(
            *(x.transpose(1, 2).reshape(b * s, h, d) for x in (q, k, v)), cu, cu, s, s, window_size=(-1, 0)
        )
        out.reshape(b, s, h * d).backward(grad)

    def repeats_bit_for_bit(step_once, times=5):
        grads = []
        for _ in range(times):
            q.grad = None
            step_once()
            grads.append(q.grad.clone())
        return all(torch.equal(grads[0], later) for later in grads[1:])

    results = {"shape": list(shape), "causal_ms": timed(lambda: step(None), args.repeats), "document": []}
    generator = torch.Generator().manual_seed(0)
    for mean_len in (int(x) for x in args.doc_lengths.split(",")):
        host_ids = doc_ids_of(args.batch, args.seq, mean_len, generator)
        doc_ids, lengths = host_ids.to(device), document_lengths(host_ids).to(device)
        mask = document_mask(doc_ids)
        varlen = VarlenMask(lengths, args.batch, args.seq, None, device)
        row = {
            "mean_doc_len": mean_len,
            "ms": timed(lambda mask=mask: step(mask), args.repeats),
            "mask_build_ms": timed(lambda doc_ids=doc_ids: document_mask(doc_ids), args.repeats),
            "varlen_ms": timed(lambda mask=varlen: step(mask), args.repeats),
            "varlen_torch_ms": timed(lambda mask=varlen: torch_varlen_step(mask), args.repeats),
            "varlen_repeats_bit_for_bit": repeats_bit_for_bit(lambda mask=varlen: step(mask)),
            "varlen_torch_repeats_bit_for_bit": repeats_bit_for_bit(lambda mask=varlen: torch_varlen_step(mask)),
            "varlen_mask_build_ms": timed(
                lambda lengths=lengths: VarlenMask(lengths, args.batch, args.seq, None, device), args.repeats
            ),
        }
        row["ratio_to_causal"] = row["ms"] / results["causal_ms"]
        row["varlen_ratio_to_causal"] = row["varlen_ms"] / results["causal_ms"]
        row["varlen_ratio_to_torch_varlen"] = row["varlen_ms"] / row["varlen_torch_ms"]
        results["document"].append(row)
        print(json.dumps(row), flush=True)
    results["device"] = torch.cuda.get_device_name(device)
    print(json.dumps(results), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
