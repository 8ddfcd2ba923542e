"""--chunked-loss: the head and the loss a few tokens at a time give the plain head's log-probabilities and
gradients, for every family and for both kinds of loss; `auto` turns it on where the logits would be large. The
layouts run it too: tests/test_family_training.py (every family against transformers at pp2 and pp2 x dp2) and
tests/test_preference_training.py (each objective's pp2 runs, DPO's frozen copy included)."""

import pytest
import torch
import torch.nn.functional as F

import modules
from config import DataConfig, JobConfig, ModelRunConfig, ObjectiveConfig
from tests.helpers import make_model
from training.chunked_logps import ChunkedHead, attach_chunked_head, chunk_tokens_for
from training.loss import TokenMeanLoss


def plain_token_logps(head, hidden, labels, softcap=None):
    logits = head(hidden)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape)


@pytest.mark.parametrize("softcap,bias", [(None, False), (3.0, True)], ids=["plain", "softcap+bias"])
def test_token_logps_and_gradients_equal_the_plain_head(softcap, bias):
    """Chunks of 5 over 33 tokens (the last one short), masked labels, a soft-cap that bends (logits ~ the cap),
    an incoming gradient that differs per token (as DPO's does): equal in float64 to rounding."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=bias).double()
    hidden = (torch.randn(3, 11, 16, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = labels[2, 7] = -100
    grad_out = torch.randn(3, 11, dtype=torch.float64)
    params = [hidden, *head.parameters()]

    want = plain_token_logps(head, hidden, labels, softcap)
    want_grads = torch.autograd.grad((want * grad_out).sum(), params)
    got = ChunkedHead(head, softcap, chunk=5).token_logps(hidden, labels)
    got_grads = torch.autograd.grad((got * grad_out).sum(), params)

    assert (got[labels == -100] == 0).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    if softcap:
        assert head(hidden).abs().max() > softcap  # the cap is in play


def test_the_token_loss_computes_its_gradients_in_the_forward_for_micro_batches_in_flight():
    """The token loss's fused path, as a GPipe last stage runs it: three micro-batches forward, then their backwards
    in another order, a validation forward without gradients in between, a bias and a soft-cap: the loss and the
    summed gradients equal the plain head's in float64 to rounding, and nothing is left pending afterwards."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=True).double()
    chunked = ChunkedHead(head, 3.0, chunk=5)
    hiddens = [(torch.randn(2, 9, 16, dtype=torch.float64) * 2).requires_grad_() for _ in range(3)]
    labels = [torch.randint(0, 97, (2, 9)) for _ in range(3)]
    labels[1][0, :4] = -100
    factor = torch.tensor(0.37, dtype=torch.float64)

    def plain_loss(hidden, label):
        return -plain_token_logps(head, hidden, label, 3.0).sum() * factor

    want = [plain_loss(h, lab) for h, lab in zip(hiddens, labels)]
    params = [*hiddens, *head.parameters()]
    want_grads = torch.autograd.grad(sum(want), params)
    got = [chunked.token_loss(h, lab, factor) for h, lab in zip(hiddens, labels)]
    with torch.no_grad():
        checked = chunked.token_loss(hiddens[0], labels[0], factor)
    torch.testing.assert_close(checked, want[0].detach(), rtol=0, atol=1e-12)
    assert chunked.sums.pending == 3
    for i in (1, 0, 2):
        got[i].backward()
    assert chunked.sums.pending == 0 and chunked.sums.weight is None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    for p, w in zip(params, want_grads):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-12)


def test_a_step_forgets_a_forward_whose_backward_never_came():
    """A forward with gradients whose backward never ran (a pipeline's placeholder pass, a failed step) must not
    hold back the head's gradient of the next step: the step's start forgets it."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    loss_fn = TokenMeanLoss(head=ChunkedHead(head, None, chunk=4))
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    loss_fn(hidden, labels)  # no backward
    layout = type("Layout", (), {"device": torch.device("cpu"), "dp_size": 1})()
    loss_fn.start_step([{"labels": labels}], 1.0, DataConfig(), layout)
    loss_fn(hidden, labels).backward()
    want = torch.autograd.grad(-plain_token_logps(head, hidden, labels).sum() / 12, head.weight)[0]
    torch.testing.assert_close(head.weight.grad, want, rtol=1e-5, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_works():
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    ChunkedHead(head, None, chunk=4).token_logps(hidden, labels).sum().backward()
    assert head.weight.grad is None and hidden.grad is not None
    want = torch.autograd.grad(-plain_token_logps(head, hidden, labels).sum(), hidden)[0]
    hidden.grad = None
    frozen = ChunkedHead(head, None, chunk=4)
    frozen.token_loss(hidden, labels, 1.0).backward()
    torch.testing.assert_close(hidden.grad, want, rtol=0, atol=1e-6)
    assert head.weight.grad is None and frozen.sums.pending == 0
    with torch.no_grad():
        out = ChunkedHead(head, None, chunk=4).token_logps(hidden, labels)
    torch.testing.assert_close(out, plain_token_logps(head, hidden, labels).detach(), rtol=0, atol=1e-6)


FAMILIES = {  # make_tiny_model flags; Gemma 2's final soft-cap is on by default
    "gptneox": (),
    "gptj": (),
    "llama": ("--tie-word-embeddings",),
    "qwen2": ("--sliding-window", "4"),
    "qwen3": ("--tie-word-embeddings",),
    "mistral": ("--sliding-window", "4"),
    "gemma2": ("--sliding-window", "4", "--tie-word-embeddings"),
    "gemma3": ("--sliding-window", "4", "--tie-word-embeddings"),
    "phi3": (),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_the_same_with_the_head_in_the_loss(family, tmp_path):
    """One stage holding the whole model: the loss and every parameter's gradient (head, tied embedding, blocks)
    with --chunked-loss (chunks of 7 tokens) equal the plain logits path in fp32, labels masked in part: the loss
    within 1e-6 (relative), each gradient within 1e-5 of its scale (the embedding's sums the blocks' backward of
    differently rounded head gradients: 4e-6 of its scale apart on an AVX-512 EPYC)."""
    path = make_model(tmp_path / family, model_type=family, hidden=32, layers=2, heads=4, extra=FAMILIES[family])
    cfg = modules.load_model_config(path)
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    modules.load_stage_weights(stage, path)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=gen)
    labels = torch.roll(ids, -1, 1)
    labels[:, :6] = -100

    def loss_and_grads(loss_fn):
        stage.zero_grad()
        loss = loss_fn(stage(ids), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in stage.named_parameters()}

    want, want_grads = loss_and_grads(TokenMeanLoss())
    stage.head_in_loss = True
    got, got_grads = loss_and_grads(TokenMeanLoss(head=ChunkedHead(stage.output_layer, cfg.final_softcap, chunk=7)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().item())
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():  # the gradient's scale: Gemma's embedding ones are ~10
        atol = 1e-5 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=atol, msg=name)


def test_auto_turns_it_on_where_a_micro_batchs_logits_exceed_4_gib(tmp_path):
    path = make_model(tmp_path / "m", hidden=32, layers=2, heads=4)
    cfg = modules.load_model_config(path)

    def attached(setting, seq, micro_batch=2, objective="sft"):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
        job = JobConfig(
            model=ModelRunConfig(model_dir=path, chunked_loss=setting),
            data=DataConfig(seq_length=seq, micro_batch_size=micro_batch),
            objective=ObjectiveConfig(kind=objective),
        )
        head = attach_chunked_head([stage], job)
        assert stage.head_in_loss == (head is not None)
        return head is not None

    # 50,304 fp32 logits a token: 2 x 8192 tokens are 3.3 GB, 2 x 16384 are 6.6 GB; a DPO pair is two rows
    assert not attached("auto", 8192) and attached("auto", 16384) and attached("auto", 8192, objective="dpo")
    assert attached("on", 16) and not attached("off", 8192)
    # a rank without the last stage has nothing to attach
    middle = modules.build_stage(cfg, 0, 1, True, False)
    assert attach_chunked_head([middle], JobConfig(model=ModelRunConfig(model_dir=path, chunked_loss="on"))) is None


def test_a_chunk_holds_a_fixed_budget_of_logits():
    assert chunk_tokens_for(50_304) == 2624 and chunk_tokens_for(262_144) == 512 and chunk_tokens_for(10**7) == 64
