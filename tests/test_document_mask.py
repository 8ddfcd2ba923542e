"""Packed documents do not see each other: a packed window through our stages (any split) gives, token for token,
the logits and the loss gradients of each document run alone through transformers (fresh positions, no padding)."""

import pytest
import torch

import modules
from tests.test_models import VOCAB, build_chain, hf_name, loss_of, make_hf_model

# Documents of a 16-token window; the last one is cut at the window's end, as tasks packs a document that spills
# into the next window (whose part there restarts its positions at 0: another document of its own).
LENGTHS = [5, 8, 3]
SEQ = sum(LENGTHS)
FAMILIES = ["gptneox_parallel", "gptneox_sequential", "gptj", "llama_gqa"]


def packed_inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).expand(batch, SEQ)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS]).expand(batch, SEQ)
    return ids, labels, doc_ids.contiguous(), position_ids.contiguous()


def run_chain(stages, ids, **kwargs):
    x = ids
    for stage in stages:
        x = stage(x, **kwargs)
    return x


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("split", [1, 2, 3], ids=["pp1", "pp2", "pp3"])
def test_packed_window_equals_each_document_alone(name, split, tmp_path):
    hf = make_hf_model(name, tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    bounds = [(i * cfg.num_layers // split, (i + 1) * cfg.num_layers // split) for i in range(split)]
    stages = build_chain(cfg, bounds, tmp_path)
    ids, labels, doc_ids, position_ids = packed_inputs()

    ours = run_chain(stages, ids, position_ids=position_ids, doc_ids=doc_ids)
    loss_of(ours, labels).backward()

    start, reference = 0, []
    for n in LENGTHS:
        logits = hf(ids[:, start : start + n]).logits
        loss_of(logits, labels[:, start : start + n]).backward()  # gradients add up over the documents
        reference.append(logits)
        start += n
    torch.testing.assert_close(ours, torch.cat(reference, dim=1), rtol=0, atol=1e-5)

    causal = run_chain(stages, ids)  # the same window without the mask differs: the test is not vacuous
    assert (causal[:, LENGTHS[0] :] - ours[:, LENGTHS[0] :]).abs().max() > 1e-3

    hf_params = dict(hf.named_parameters())
    for stage in stages:
        for n, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, hf_params[hf_name(cfg, n)].grad, rtol=1e-5, atol=4e-5, msg=n)


def test_one_document_per_row_equals_causal(tmp_path):
    """A window holding one document: the document mask and plain causal attention agree exactly."""
    make_hf_model("llama_gqa", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    (stage,) = build_chain(cfg, [(0, cfg.num_layers)], tmp_path)
    ids, _, _, _ = packed_inputs()
    with torch.no_grad():
        masked = stage(ids, doc_ids=torch.zeros_like(ids))
        torch.testing.assert_close(masked, stage(ids), rtol=0, atol=1e-6)


def test_document_mask_with_activation_checkpointing(tmp_path):
    make_hf_model("gptneox_parallel", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    ids, labels, doc_ids, position_ids = packed_inputs()
    grads = []
    for mode in ("none", "full"):
        (stage,) = build_chain(cfg, [(0, cfg.num_layers)], tmp_path, activation_checkpointing=mode)
        loss_of(stage(ids, position_ids=position_ids, doc_ids=doc_ids), labels).backward()
        grads.append({n: p.grad for n, p in stage.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("seq", [128, 300, 640])
def test_gpu_block_mask_equals_flex_reference(seq):
    """The GPU path's block mask, built from per-block document ranges, is the one `create_block_mask` derives
    from the mask itself (same full and partial blocks, same order), and FlexAttention under it equals SDPA under
    the dense document mask the CPU path uses."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from modules.layers import DocumentBlockMask, document_mask

    g = torch.Generator().manual_seed(seq)
    for density in (0.0, 0.003, 0.02, 0.1):
        doc_ids = (torch.rand(3, seq, generator=g) < density).long().cumsum(1)
        ours = DocumentBlockMask(doc_ids).block_mask

        def same_document_causal(b, h, q, kv, doc_ids=doc_ids):
            return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

        reference = create_block_mask(same_document_causal, 3, None, seq, seq, device="cpu")
        for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            n = getattr(reference, counts)
            assert torch.equal(getattr(ours, counts).to(n.dtype), n), (density, counts)
            for b, q in zip(*torch.nonzero(n[:, 0] >= 0, as_tuple=True)):
                k = int(n[b, 0, q])
                assert torch.equal(
                    getattr(ours, indices)[b, 0, q, :k].long(), getattr(reference, indices)[b, 0, q, :k].long()
                )
        assert torch.equal(ours.to_dense(), reference.to_dense())
        q, k, v = torch.randn(3, 3, 2, seq, 16, generator=g).unbind(0)
        torch.testing.assert_close(
            flex_attention(q, k, v, block_mask=ours),
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_flex_attention_may_compile_for_many_shapes(monkeypatch):
    """Past torch.compile's recompile limit (8 by default) FlexAttention would run uncompiled, silently, and
    materialise every score: a run has more shapes than that (training, evaluation, the last short batch, each mask
    kind; the GPU test suite hit it in one process). Its compile raises the limit, never lowers a larger one."""
    import torch._dynamo

    from modules import layers

    config = torch._dynamo.config
    for before, after in ((8, 32), (100, 100)):
        monkeypatch.setattr(config, "recompile_limit", before)
        layers._flex_attention.cache_clear()
        layers._flex_attention()
        assert config.recompile_limit == after
    layers._flex_attention.cache_clear()
