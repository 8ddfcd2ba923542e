"""The training loss: token-mean cross-entropy, and its recomputing variant that keeps no fp32 log-probabilities."""

import torch

from training.loss import TokenMeanLoss


def saved_bytes(fn):
    """Bytes autograd keeps for backward while running fn()."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_recomputed_loss_is_equal_and_keeps_only_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 16))
    labels[0, :5] = -100
    results = {}
    for recompute in (False, True):
        loss_fn = TokenMeanLoss(recompute=recompute)
        loss_fn.factor = 1.0 / (labels != -100).sum()
        loss, kept = saved_bytes(lambda loss_fn=loss_fn: loss_fn(logits, labels))
        (grad,) = torch.autograd.grad(loss, logits)
        results[recompute] = (loss.detach(), grad, kept)
    plain, recomputed = results[False], results[True]
    assert torch.equal(plain[0], recomputed[0]) and torch.equal(plain[1], recomputed[1])
    fp32_logprobs = 2 * 16 * 1000 * 4
    assert plain[2] >= fp32_logprobs  # the plain loss keeps the fp32 log-probabilities
    assert recomputed[2] < 0.6 * fp32_logprobs  # the recomputing one keeps the bf16 logits (half) and labels
