"""The preference objectives equal TRL's own loss functions on the same log-probabilities (values, rewards and
gradients), and the last stage's loss function splits into micro-batches like one batch, and a micro-batch cut to its
longest row like the padded one: what the layouts rely on."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F

import modules
from config import ObjectiveConfig, PipelineConfig
from pipeline_parallel import Pipeline, StagePlan
from tests.helpers import make_model
from training.chunked_logps import ChunkedHead
from training.pairs import micro_batch_widths, pack_pairs, text_tokens, width_multiple
from training.preference import PreferenceLoss, dpo_losses, orpo_losses, simpo_losses, split_target, with_reference

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

PAIRS = 6


def logps(seed: int, scale: float = 20.0, dtype=torch.float64) -> torch.Tensor:
    """Sequence log-probabilities of PAIRS sequences, in (-scale, 0]."""
    return (-torch.rand(PAIRS, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale).requires_grad_()


def trl_self(**kw):
    """What TRL's loss methods read from their trainer."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **kw)


def assert_same(ours, theirs, inputs, tol=1e-12):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    grads = torch.autograd.grad(ours[0].sum(), inputs)
    want = torch.autograd.grad(theirs[0].sum(), inputs)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_is_trls_sigmoid_loss_on_the_log_ratios(smoothing):
    """DPO is TRL's sigmoid preference loss of the policy's log-ratios against the reference (CPO's `cpo_loss` on
    them: the same function with the reference subtracted), conservative DPO's label smoothing included."""
    chosen, rejected, ref_c, ref_r = logps(0), logps(1), logps(2), logps(3)
    beta = 0.3
    ours = dpo_losses(chosen, rejected, ref_c, ref_r, beta, smoothing)
    trl = trl_self(beta=beta, label_smoothing=smoothing, loss_type="sigmoid")
    theirs = cpo_trainer.CPOTrainer.cpo_loss(trl, chosen - ref_c, rejected - ref_r)
    assert_same(ours, theirs, (chosen, rejected, ref_c, ref_r))
    # and the paper's formula
    paper = -F.logsigmoid(beta * ((chosen - ref_c) - (rejected - ref_r)))
    if smoothing == 0:
        torch.testing.assert_close(ours[0], paper)


def test_simpo_is_trls_simpo_loss():
    chosen, rejected = logps(4, 3.0), logps(5, 3.0)  # length-normalised: a few nats per token
    trl = trl_self(beta=2.0, simpo_gamma=0.7, label_smoothing=0.0, loss_type="simpo")
    ours = simpo_losses(chosen, rejected, 2.0, 0.7)
    assert_same(ours, cpo_trainer.CPOTrainer.cpo_loss(trl, chosen, rejected), (chosen, rejected))


def test_orpo_odds_ratio_is_trls():
    """TRL returns +lambda * log sigmoid(log odds) (subtracted from the NLL); ours is the per-pair loss itself.
    TRL computes in fp32."""
    chosen, rejected = logps(6, 3.0, torch.float32), logps(7, 3.0, torch.float32)
    chosen.data[0] = -1e-4  # near probability 1: log(1 - exp(x)) must stay finite and accurate
    ours = orpo_losses(chosen, rejected, 0.25)
    losses, reward_c, reward_r, _, _ = orpo_trainer.ORPOTrainer.odds_ratio_loss(trl_self(beta=0.25), chosen, rejected)
    assert_same((ours[0], ours[1], ours[2]), (-losses, reward_c, reward_r), (chosen, rejected), 1e-6)


def batch_of(pairs: int, seq: int, vocab: int, seed: int):
    """Logits [2P, S, V] and labels with completion spans of varied lengths (rows 2i chosen, 2i+1 rejected)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, seq, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    starts = torch.randint(1, seq // 2, (2 * pairs, 1), generator=g)
    ends = torch.randint(seq // 2 + 1, seq, (2 * pairs, 1), generator=g)
    index = torch.arange(seq)
    labels[(index < starts) | (index >= ends)] = -100
    return logits, labels


def reference_formula(kind, logits, labels, reference, cfg):
    """The step loss from the papers' formulas over the whole batch at once: mean over pairs (+ ORPO's NLL mean
    over chosen tokens)."""
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    sums, counts = token.sum(1), (labels != -100).sum(1)
    c, r = sums[0::2], sums[1::2]
    if kind == "dpo":
        z = cfg.dpo_beta * ((c - reference[0::2]) - (r - reference[1::2]))
        return -F.logsigmoid(z).mean()
    c, r = c / counts[0::2], r / counts[1::2]
    if kind == "simpo":
        return -F.logsigmoid(cfg.simpo_beta * (c - r) - cfg.simpo_gamma).mean()
    odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    nll = -token[0::2].sum() / counts[0::2].sum()
    return nll - cfg.orpo_lambda * F.logsigmoid(odds).mean()


@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo"])
def test_micro_batches_sum_to_the_formula_over_the_step(kind):
    """Split into micro-batches of two pairs, each scaled by the step's pair (and chosen-token) count, the losses
    and gradients add up to the formula over the whole step."""
    cfg = ObjectiveConfig(kind=kind)
    logits, labels = batch_of(PAIRS, 12, 7, seed=1)
    reference = torch.randn(2 * PAIRS, dtype=torch.float64) * 3 - 10
    want = reference_formula(kind, logits.clone().requires_grad_(), labels, reference, cfg)
    leaf = logits.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(reference_formula(kind, leaf, labels, reference, cfg), leaf)
    loss_fn = PreferenceLoss(cfg)
    loss_fn.factor = 1.0 / PAIRS
    loss_fn.nll_factor = 1.0 / float((labels[0::2] != -100).sum())
    ours = logits.clone().requires_grad_()
    target = with_reference(labels, reference)
    total = sum(loss_fn(lg, t) for lg, t in zip(ours.split(4), target.split(4)))
    total.backward()
    loss_fn.commit(PAIRS // 2)
    torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.grad, want_grad, rtol=1e-10, atol=1e-12)
    stats = loss_fn.take_stats()
    assert stats[0] == PAIRS and loss_fn.take_stats() is None


def test_target_carries_the_reference_bits_exactly_and_padding_pairs_count_for_nothing():
    labels = torch.full((4, 5), -100)
    labels[:2, 2:] = 3  # pair 0 real, pair 1 all padding
    reference = torch.tensor([-1.25, -3.0, 7e-300, float("-inf")], dtype=torch.float64)
    got_labels, got_reference = split_target(with_reference(labels, reference))
    assert torch.equal(got_labels, labels) and torch.equal(got_reference, reference)
    loss_fn = PreferenceLoss(ObjectiveConfig(kind="dpo"))
    logits = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    reference[2:] = 0
    loss = loss_fn(logits, with_reference(labels, reference))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[2:].abs().sum() == 0
    loss_fn(logits, with_reference(labels, reference))  # a schedule's placeholder call, then the real one
    loss_fn.commit(1)
    assert loss_fn.take_stats()[0] == 1


def test_recording_keeps_row_log_probabilities_and_forms_no_loss():
    loss_fn = PreferenceLoss(ObjectiveConfig(kind="dpo"))
    loss_fn.recording = []
    logits, labels = batch_of(2, 6, 5, seed=3)
    loss = loss_fn(logits, with_reference(labels, None))
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    assert loss.item() == 0 and loss_fn.stats is None
    torch.testing.assert_close(loss_fn.recording[0], token.sum(1))


def test_micro_batch_widths_reach_the_last_label_rounded_up():
    labels = torch.full((8, 40), -100)
    labels[0, 3:9] = 1  # micro-batch 0: last label at column 8 -> 9 columns -> 16
    labels[5, 30:38] = 1  # micro-batch 2: column 37 -> 40 (capped at the row length)
    labels[7, 20] = 1  # micro-batch 3: column 20 -> 24; micro-batch 1 has no label (filler pairs) -> 8
    assert micro_batch_widths(labels, 4) == [16, 8, 40, 24]
    assert micro_batch_widths(labels, 1) == [40]
    # where FlexAttention runs (compiled for fixed shapes), eighths of the row: at most eight widths a run
    plain = types.SimpleNamespace(attn_softcap=None, layer_types=("sliding", "full"), sliding_window=4096)
    assert width_multiple(plain, 1024, packed=False) == 8
    assert width_multiple(plain, 1024, packed=True) == 128
    assert width_multiple(types.SimpleNamespace(**{**vars(plain), "sliding_window": 512}), 1024, False) == 128
    assert width_multiple(types.SimpleNamespace(**{**vars(plain), "attn_softcap": 50.0}), 1000, False) == 128
    assert micro_batch_widths(labels, 4, multiple=24) == [24, 24, 40, 24]


def test_text_tokens_are_each_rows_prompt_and_completion_without_its_padding():
    """What tokens/s and MFU count for pairs: every row's prompt + completion (its EOS included, padding alike in
    tokens, as where the tokenizer pads with EOS), a row the whole window long, an empty prompt, nothing for a filler
    pair; rows as tasks.PreferenceStream lays them out."""
    from tasks.preference import pair_rows

    eos = 0
    pairs = [
        ([5, 6, 7], [8, 9, eos], [10, eos]),  # 6 and 5 tokens
        ([], [11, 12, eos], [13, eos]),  # 3 and 2
        None,  # a filler pair: 0
        ([1, 2, 3, 4], [2] * 11 + [eos], [3, eos]),  # 16 (the window) and 6
    ]
    batch = pair_rows([(*pair, False) if pair else None for pair in pairs], seq_length=16, pad=eos)
    assert text_tokens(batch["labels"]) == 6 + 5 + 3 + 2 + 16 + 6


@pytest.mark.parametrize(
    "kind,chunked,family",
    [("dpo", False, "llama"), ("orpo", False, "llama"), ("dpo", True, "llama"), ("orpo", True, "llama")]
    + [("dpo", False, "gemma2")],  # sliding windows of 4 (within documents) and soft-capped scores
)
def test_micro_batches_cut_or_packed_train_like_the_padded_rows(kind, chunked, family, tmp_path):
    """pp=1 runs each micro-batch of pairs on its columns up to its last label only, its sequences left in their rows
    or packed into one row as documents: the loss, the statistics and every parameter's gradient equal those of the
    rows padded to --seq-length (fp32, within 1e-6)."""
    extra = ("--sliding-window", "4", "--tie-word-embeddings") if family == "gemma2" else ()
    path = make_model(tmp_path / "m", model_type=family, hidden=32, layers=2, heads=4, extra=extra)
    cfg = modules.load_model_config(path)
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    modules.load_stage_weights(stage, path)
    stage.head_in_loss = chunked
    gen = torch.Generator().manual_seed(3)
    rows, seq = 8, 40
    ids = torch.randint(1, cfg.vocab_size, (rows, seq), generator=gen)
    labels = torch.full((rows, seq), -100)
    ends = [12, 9, 15, 7, 33, 40, 21, 26]  # each row's real length: micro-batches of 2 pairs end at 15 and 40
    for row, end in enumerate(ends):
        labels[row, 4 : end - 1] = ids[row, 5:end]
        ids[row, end:] = 0  # padding
    reference = torch.randn(rows, dtype=torch.float64) - 20
    assert micro_batch_widths(labels, 2) == [16, 40]
    packed = pack_pairs({"input_ids": ids, "labels": labels}, 2)
    assert packed["input_ids"].shape == (2, 160)
    # micro-batch 0 holds rows 0-3 (11 + 8 + 14 + 6 tokens up to their last label), then padding (document 4)
    assert packed["doc_ids"][0, :40].tolist() == [0] * 11 + [1] * 8 + [2] * 14 + [3] * 6 + [4]
    assert packed["position_ids"][0, 11:20].tolist() == list(range(8)) + [0]
    assert torch.equal(packed["input_ids"][1, :32], ids[4, :32])
    assert micro_batch_widths(packed["labels"], 2, multiple=width_multiple(cfg, 160, packed=True)) == [64, 128]

    def run(layout: str):
        head = ChunkedHead(stage.output_layer, cfg.final_softcap, chunk=5) if chunked else None
        columns = 160 if layout == "packed" else None
        loss_fn = PreferenceLoss(ObjectiveConfig(kind=kind), head=head, packed_columns=columns)
        loss_fn.factor, loss_fn.nll_factor = 0.25, 0.01
        plan = StagePlan(num_stages=1, bounds=[(0, cfg.num_layers)], stage_ids=[0])
        pipeline = Pipeline([stage], plan, None, PipelineConfig(micro_batches=2), loss_fn)
        stage.zero_grad()
        if layout == "packed":
            target = with_reference(packed["labels"], reference, packed["doc_ids"])
            widths = micro_batch_widths(packed["labels"], 2, multiple=40)
            documents = {k: packed[k] for k in ("position_ids", "doc_ids")}
            loss = pipeline.run(packed["input_ids"], target, widths=widths, **documents)
        else:
            cut = micro_batch_widths(labels, 2) if layout == "cut" else None
            loss = pipeline.run(ids, with_reference(labels, reference), widths=cut)
        loss_fn.commit(2)
        return loss, loss_fn.take_stats(), {n: p.grad.clone() for n, p in stage.named_parameters()}

    padded = run("padded")
    for layout in ("cut", "packed"):
        got = run(layout)
        torch.testing.assert_close(got[0], padded[0], rtol=1e-6, atol=1e-7, msg=layout)
        # the statistics are fp32 sums over hundreds of tokens, added in another order when packed: within 1e-6 of
        # the largest of them (the summed log-probabilities)
        scale = padded[1].abs().max().item()
        torch.testing.assert_close(got[1], padded[1], rtol=0, atol=1e-6 * scale, msg=layout)
        for name, grad in padded[2].items():
            atol = 1e-6 * max(1.0, grad.abs().max().item())
            torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=atol, msg=f"{layout} {name}")
