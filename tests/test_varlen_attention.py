"""Packed documents and sliding windows through varlen flash attention (modules.varlen.VarlenMask,
--masked-attention varlen), a GPU path of half-precision models: the kernel against a float64 reference and against
FlexAttention (the fp32 path, proven equal to transformers in test_families), its gradients repeated bit for bit,
the families' stages, the compiled blocks over batches holding different numbers of documents, and whole training
runs that count the documents' lengths on the host and repeat bit for bit."""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import modules
from modules import layers
from modules.varlen import VarlenMask
from tasks.packing import document_lengths
from tests.helpers import ENTRYPOINT, REPO, base_flags, make_chat_data, make_model, read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs a CUDA device"),
]


def random_doc_ids(rows: list[float], seq: int, generator: torch.Generator) -> torch.Tensor:
    """One row per density: a document starts at each position with that probability (0: one document)."""
    return torch.stack([(torch.rand(seq, generator=generator) < p).long().cumsum(0) for p in rows])


def dense_visible(doc_ids: torch.Tensor | None, batch: int, seq: int, window: int | None) -> torch.Tensor:
    """[B, 1, S, S] True where a query sees a key: causal, within its document and its window."""
    pos = torch.arange(seq)
    visible = (pos[:, None] >= pos[None, :]).expand(batch, seq, seq)
    if window is not None:
        visible = visible & (pos[:, None] - pos[None, :] < window)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return visible[:, None]


def attention_and_grads(q, k, v, grad, mask):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = layers.causal_attention(q, k, v, mask)
    out.backward(grad)
    return [out, q.grad, k.grad, v.grad]


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.mark.parametrize(
    "window,packed", [(None, True), (100, True), (100, False)], ids=["docs", "docs+window", "window"]
)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_varlen_attention_equals_a_float64_reference(window, packed, kv_heads):
    """bf16 output and q/k/v gradients over rows holding many, few and one document (so the rows' lengths are
    zero-padded to different counts) against float64 SDPA under the dense mask, as close as FlexAttention's."""
    batch, seq, heads, dim, device = 3, 640, 4, 64, torch.device("cuda")
    g = torch.Generator().manual_seed(11)
    doc_ids = random_doc_ids([0.02, 0.003, 0.0], seq, g) if packed else None
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, dim, generator=g) for _ in range(2))
    grad = torch.randn(batch, seq, heads * dim, generator=g)

    rep = heads // kv_heads
    visible = dense_visible(doc_ids, batch, seq, window)
    reference = [x.double().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(
        reference[0], reference[1].repeat_interleave(rep, 1), reference[2].repeat_interleave(rep, 1), attn_mask=visible
    )
    want = want.transpose(1, 2).reshape(batch, seq, heads * dim)
    want.backward(grad.double())
    want = [want.detach()] + [x.grad for x in reference]

    half = [x.to(device, torch.bfloat16) for x in (q, k, v, grad)]
    lengths = document_lengths(doc_ids).to(device) if packed else None
    varlen = VarlenMask(lengths, batch, seq, window, device)
    got = [x.cpu() for x in attention_and_grads(*half, varlen)]
    flex_docs = doc_ids.to(device) if packed else None
    flex = (
        layers.WindowBlockMask(flex_docs, batch, seq, window, device) if window else layers.DocumentBlockMask(flex_docs)
    )
    flexed = [x.cpu() for x in attention_and_grads(*half, flex)]

    ours, theirs = relative_errors(got, want), relative_errors(flexed, want)
    assert max(ours) < 2e-2, ours
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a <= 2 * b + 2e-3, (name, ours, theirs)
    unmasked = relative_errors([attention_and_grads(*half, None)[0].cpu()], want[:1])[0]
    assert unmasked > 0.1  # plain causal attention is far off: the masks matter here


def test_varlen_gradients_repeat_bit_for_bit():
    """FlashAttention-2's backward adds each query's gradient over the key blocks in a run-dependent order unless
    torch's deterministic mode is on; the varlen op switches it on for that call: five backward passes over 8 rows of
    2,048 tokens (documents of a few hundred) give the same gradients bit for bit, eager and compiled."""
    batch, seq, heads, dim, device = 8, 2048, 16, 128, torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    doc_ids = random_doc_ids([0.004] * batch, seq, g)
    mask = VarlenMask(document_lengths(doc_ids).to(device), batch, seq, None, device)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g).to(device, torch.bfloat16) for _ in range(3))
    grad = torch.randn(batch, seq, heads * dim, generator=g).to(device, torch.bfloat16)
    eager = functools.partial(layers.causal_attention, mask=mask)
    for name, attend in (("eager", eager), ("compiled", torch.compile(eager))):
        runs = []
        for _ in range(5):
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            attend(*inputs).backward(grad)
            runs.append([x.grad for x in inputs])
        assert all(torch.equal(a, b) for later in runs[1:] for a, b in zip(runs[0], later)), name


FAMILIES = ["qwen2", "mistral", "gemma3", "phi3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_stages_on_varlen_match_flex_attention(name, tmp_path, monkeypatch):
    """A family's bf16 stage with packed documents (and its sliding layers) on varlen flash attention: logits and
    gradients as close to the fp32 stage (FlexAttention, equal to transformers) as the same bf16 stage on
    FlexAttention."""
    from tests.test_families import hf_model, loss_of

    torch.backends.cuda.matmul.allow_tf32 = False
    hf_model(name, tmp_path, head_dim=64)
    cfg = modules.load_model_config(str(tmp_path))
    seq, batch = 320, 2
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, cfg.vocab_size - 1, (batch, seq), generator=g).cuda()
    labels = torch.roll(ids, -1, 1)
    doc_ids = random_doc_ids([0.01, 0.004], seq, g)
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    index = torch.arange(seq).expand(batch, seq)
    position_ids = (index - torch.cummax(torch.where(starts, index, 0), 1).values).cuda()
    kwargs = {"position_ids": position_ids, "doc_ids": doc_ids.cuda(), "doc_lengths": document_lengths(doc_ids).cuda()}

    def run(dtype, kernel):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
        modules.load_stage_weights(stage, str(tmp_path))
        stage = stage.to("cuda", dtype)
        stage.masked_attention = kernel
        logits = stage(ids, **kwargs)
        loss_of(logits.float(), labels).backward()
        return [logits.detach().float()] + [p.grad.float() for p in stage.parameters() if p.grad is not None]

    built = []
    monkeypatch.setattr(VarlenMask, "__init__", spy(VarlenMask.__init__, built))
    want = [x.double() for x in run(torch.float32, "varlen")]
    assert not built  # fp32 stays on FlexAttention
    varlen = relative_errors(run(torch.bfloat16, "varlen"), want)
    assert built  # and bf16 takes the varlen kernel
    flex = relative_errors(run(torch.bfloat16, "flex"), want)
    assert len(built) == 1 + ("sliding" in cfg.layer_types)  # the flex run built none
    assert varlen[0] <= 2 * flex[0] + 1e-3, (varlen[0], flex[0])  # logits
    assert max(varlen[1:]) <= 2 * max(flex[1:]) + 1e-3, (max(varlen[1:]), max(flex[1:]))  # gradients


def spy(init, calls: list):
    def wrapped(self, *args, **kwargs):
        calls.append(args)
        init(self, *args, **kwargs)

    return wrapped


def test_compiled_blocks_take_batches_with_any_number_of_documents(tmp_path):
    """The blocks compiled once serve micro-batches holding different numbers of documents (the lengths' shape
    changes from batch to batch): each batch's bf16 logits as close to the fp32 stage's as the eager bf16 stage's
    (bf16 logits of compiled and eager blocks differ by their own rounding, a few tenths at the extremes). The fp32
    stage runs on the CPU: on a GPU its FlexAttention would compile, which needs heads of at least 16 dimensions."""
    from tests.test_models import VOCAB, make_hf_model

    make_hf_model("llama_gqa", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    stages = {}
    for name, device, dtype, compiled in (
        ("fp32", "cpu", torch.float32, False),
        ("eager", "cuda", torch.bfloat16, False),
        ("compiled", "cuda", torch.bfloat16, True),
    ):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
        modules.load_stage_weights(stage, str(tmp_path))
        stage = stage.to(device, dtype)
        stage.masked_attention = "varlen"
        if compiled:
            for block in stage.blocks:
                block.compile()
        stages[name] = stage
    g = torch.Generator().manual_seed(2)
    for density in (0.01, 0.03, 0.05, 0.002):
        doc_ids = random_doc_ids([density, density / 2], 256, g)
        inputs = {"doc_ids": doc_ids, "doc_lengths": document_lengths(doc_ids)}
        ids = torch.randint(0, VOCAB, doc_ids.shape, generator=g)
        logits = {}
        with torch.no_grad():
            for name, stage in stages.items():
                device = next(stage.parameters()).device
                kwargs = {key: value.to(device) for key, value in inputs.items()}
                logits[name] = stage(ids.to(device), **kwargs).double().cpu()
        compiled, eager = (relative_errors([logits[k]], [logits["fp32"]])[0] for k in ("compiled", "eager"))
        assert compiled <= 2 * eager + 1e-3, (density, compiled, eager)


def run_trainer(flags: list[str]) -> str:
    """The entrypoint in a process of its own (two NCCL jobs in one process do not clean up after each other):
    returns its stdout once it has exited 0."""
    done = subprocess.run([sys.executable, ENTRYPOINT, *flags], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def losses_on_both_kernels(flags_of_run) -> dict:
    """{kernel: {step: loss}} of the run `flags_of_run(kernel)` (its --masked-attention) on varlen flash attention,
    then on FlexAttention; the varlen run must say it runs on varlen attention."""
    losses = {}
    for kernel in ("varlen", "flex"):
        run = flags_of_run(kernel)
        stdout = run_trainer(run["flags"])
        says_varlen = "attention: packed documents and sliding windows on varlen flash attention" in stdout
        assert says_varlen == (kernel == "varlen"), stdout[-3000:]
        losses[kernel] = read_metrics(run["file"])
    return losses


def gpu_run(kernel: str) -> dict:
    return {"bf16": True, "use-cuda": "true", "dp-backend": "nccl", "masked-attention": kernel}


def test_a_bf16_run_on_varlen_attention_trains_as_on_flex_attention(tmp_path):
    """The trainer hands the stages the documents' lengths (counted on the host): a bf16 run with packed
    documents on varlen flash attention logs the losses of the same run on FlexAttention, to bf16's precision."""
    model_dir = make_model(tmp_path / "model", model_type="llama", hidden=128, layers=2, heads=2)
    data = make_chat_data(tmp_path / "chat.jsonl")

    def run(kernel):
        file = tmp_path / f"{kernel}.jsonl"
        overrides = {**gpu_run(kernel), "total-steps": 4, "seq-length": 128, "metrics-file": str(file)}
        return {"file": file, "flags": base_flags(model_dir, data, str(tmp_path / f"ck-{kernel}"), **overrides)}

    losses = losses_on_both_kernels(run)
    assert sorted(losses["varlen"]) == [1, 2, 3, 4]
    for step, loss in losses["flex"].items():
        assert losses["varlen"][step] == pytest.approx(loss, rel=1e-2), step


def test_packed_preference_pairs_on_varlen_attention_trains_as_on_flex_attention(tmp_path):
    """DPO with --pack-pairs: each micro-batch runs on its own width, and the lengths are counted on the rows as cut
    to it; the losses are those of the same run on FlexAttention, to bf16's precision."""
    from tests.test_preference_training import flags_of, make_pairs

    model_dir = make_model(tmp_path / "model", model_type="llama", hidden=128, layers=2, heads=2)
    data = make_pairs(tmp_path / "pairs.jsonl")

    def run(kernel):
        file = tmp_path / f"{kernel}.jsonl"
        extra = {**gpu_run(kernel), "pack-pairs": "true", "micro-batch-size": 2, "metrics-file": str(file)}
        return {"file": file, "flags": flags_of(model_dir, data, tmp_path / f"ck-{kernel}", "dpo", **extra)}

    losses = losses_on_both_kernels(run)
    assert losses["varlen"] and sorted(losses["varlen"]) == sorted(losses["flex"])
    for step, loss in losses["flex"].items():
        assert losses["varlen"][step] == pytest.approx(loss, rel=1e-2, abs=1e-3), step


@pytest.mark.parametrize("kernel", ["flex", "varlen"])
def test_two_bf16_runs_log_the_same_numbers_bit_for_bit(kernel, tmp_path):
    """Runs repeat on a GPU on either kernel (what lets a resumed run follow the uninterrupted one): two identical
    bf16 runs with packed documents log the same losses and gradient norms, bit for bit."""
    model_dir = make_model(tmp_path / "model", model_type="llama", hidden=128, layers=2, heads=2)
    data = make_chat_data(tmp_path / "chat.jsonl")
    records = []
    for attempt in ("first", "second"):
        file = tmp_path / f"{attempt}.jsonl"
        overrides = {**gpu_run(kernel), "total-steps": 6, "seq-length": 512, "metrics-file": str(file)}
        run_trainer(base_flags(model_dir, data, str(tmp_path / f"ck-{attempt}"), **overrides))
        records.append((read_metrics(file), read_metrics(file, "grad_norm")))
    assert sorted(records[0][0]) == sorted(records[0][1]) == [1, 2, 3, 4, 5, 6]
    assert records[0] == records[1]
