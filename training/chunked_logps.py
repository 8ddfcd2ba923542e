"""--chunked-loss: the LM head's matmul, log-softmax and the labels' log-probabilities, a few tokens at a time.

The last stage then hands the loss its final hidden states [R, S, H] instead of logits [R, S, V], and the logits of
the whole window never exist: at a 128k vocabulary, 16k tokens of fp32 logits are 8 GB (plus as much again for the
softmax in the backward), where one chunk is a fixed budget (CHUNK_ELEMENTS logits).

The token loss (cross-entropy summed and scaled, training/loss.py) knows its gradient per token in the forward: it is
the loss's factor wherever a label counts. So it computes each chunk's gradients right there, as liger-kernel's fused
linear cross-entropy does (three head matmuls per token, as the plain head, instead of four), and its backward only
hands them on. The head weight's gradient sums in one buffer per head over the micro-batches whose backward is still
to come (a GPipe last stage runs every forward first), not one per micro-batch. The preference objectives sum the
log-probabilities per sequence and pass them through their own loss: their gradient per token exists only in the
backward, so their chunks are recomputed there (ChunkedTokenLogps). Gemma's final soft-cap (cap · tanh(logit / cap))
is applied per chunk, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from config import JobConfig

# fp32 logits of one chunk: 512 MB, whatever the vocabulary (1,024 tokens at Llama 3's). Measured on an H100 at 16k
# Llama-3 tokens, twice 2^26's chunk was 10% faster for 0.5 GB more (each chunk adds into the whole head-weight
# gradient: fewer chunks, less of that traffic); twice again gained 3% more for 1 GB more.
CHUNK_ELEMENTS = 1 << 27
IGNORE = -100


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_ELEMENTS logits, at least 64 tokens, a multiple of 64 (matmul-friendly)."""
    return max(64, CHUNK_ELEMENTS // vocab_size // 64 * 64)


def _chunk_logits(hidden, weight, bias, softcap: float | None):
    """(logits [T, V] in fp32 or wider, soft-capped where there is a cap; tanh(logit / cap) for its derivative)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not softcap:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return softcap * squashed, squashed


def _logps_grad(logits, squashed, lse, labels, grad):
    """d(sum grad · logp)/d(head output) [T, V] from a chunk's logits: grad · (one-hot(label) - softmax), through the
    soft-cap's derivative 1 - tanh² where there is one; ignored labels get none."""
    grad = torch.where(labels == IGNORE, 0.0, grad.to(logits.dtype))
    out = torch.exp(logits - lse[:, None]) * -grad[:, None]
    out.scatter_add_(1, labels.clamp(min=0)[:, None], grad[:, None])
    if squashed is not None:
        out = out * (1 - squashed * squashed)
    return out


def _chunk_forward(hidden, weight, bias, labels, softcap: float | None):
    """(log-probabilities of `labels` [T] (0 where ignored), logsumexp [T]) of one chunk, in fp32 (or wider)."""
    logits, _ = _chunk_logits(hidden, weight, bias, softcap)
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(labels == IGNORE, 0.0, picked - lse), lse


def _chunk_logit_grad(hidden, weight, bias, labels, lse, grad, softcap: float | None):
    """d(sum grad · logp)/d(head output) of one chunk [T, V], in fp32, its logits computed again."""
    logits, squashed = _chunk_logits(hidden, weight, bias, softcap)
    return _logps_grad(logits, squashed, lse, labels, grad)


class ChunkedTokenLogps(torch.autograd.Function):
    """log p(label) per token [N] from hidden states [N, H] and the head's weight [V, H] (and bias [V]), `chunk`
    tokens at a time; gradients flow to the hidden states, the weight and the bias as through the plain head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, chunk, kernels):
        forward_chunk = kernels[0]
        logps, lses = [], []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                logp, lse = forward_chunk(
                    hidden[start : start + chunk], weight, bias, labels[start : start + chunk], softcap
                )
                logps.append(logp)
                lses.append(lse)
        ctx.save_for_backward(hidden, weight, bias, labels, torch.cat(lses))
        ctx.softcap, ctx.chunk, ctx.kernels = softcap, chunk, kernels
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grad_chunk, chunk = ctx.kernels[1], ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_bias = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logit_grad = grad_chunk(hidden[part], weight, bias, labels[part], lse[part], grad_logps[part], ctx.softcap)
            if need_b:
                grad_bias += logit_grad.sum(0)
            logit_grad = logit_grad.to(weight.dtype)
            if need_h:
                torch.matmul(logit_grad, weight, out=grad_hidden[part])
            if need_w:  # accumulated in the weight's dtype, each chunk's product summed in fp32 by the matmul
                grad_weight.addmm_(logit_grad.t(), hidden[part])
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_b else None, None, None, None, None


def _chunk_loss_and_grad(hidden, weight, bias, labels, factor, softcap: float | None):
    """-factor · (sum of the label log-probabilities) of one chunk, fp32, its gradient with respect to the head's
    output [T, V], factor · (softmax - one-hot(label)) on the counted rows through the soft-cap, computed in fp32 and
    handed out in the weight's dtype (the matmuls' input: cast inside the compiled kernel, not in passes of its own),
    and that gradient's sum over the chunk's tokens in fp32 (the bias's gradient; None without a bias)."""
    logits, squashed = _chunk_logits(hidden, weight, bias, softcap)
    lse = torch.logsumexp(logits, -1)
    counted = labels != IGNORE
    loss = torch.where(counted, lse - logits.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0).sum() * factor
    logit_grad = _logps_grad(logits, squashed, lse, labels, -factor.expand(labels.shape))
    return loss, logit_grad.to(weight.dtype), None if bias is None else logit_grad.sum(0)


class HeadGradients:
    """The head weight's (and bias's) gradient summed over the micro-batches whose forward ran and backward did not
    yet: the last of those backwards hands the sum to autograd, the others hand nothing (autograd sums them alike)."""

    def __init__(self):
        self.reset()

    def reset(self):
        """Forget sums of forwards whose backward never came (a step's start: none of them is due any more)."""
        self.weight = self.bias = None
        self.pending = 0

    def add(self, logit_grad, bias_grad, hidden, need_w: bool, need_b: bool, weight: torch.Tensor):
        if need_w:
            if self.weight is None:
                self.weight = torch.zeros_like(weight)
            # accumulated in the weight's dtype, each chunk's product summed in fp32 by the matmul
            self.weight.addmm_(logit_grad.t(), hidden)
        if need_b:
            self.bias = bias_grad if self.bias is None else self.bias + bias_grad

    def take(self, grad_out: torch.Tensor, bias_dtype: torch.dtype | None):
        """(weight gradient, bias gradient) for one backward; the sums on the last pending one, else Nones. The
        loss is backward's root in training (gradient 1); `grad_out` scales the sums all the same."""
        self.pending -= 1
        if self.pending > 0:
            return None, None
        weight = None if self.weight is None else self.weight.mul_(grad_out.to(self.weight.dtype))
        bias_grad = None if self.bias is None else (self.bias * grad_out).to(bias_dtype)
        self.weight = self.bias = None
        return weight, bias_grad


class ChunkedTokenLoss(torch.autograd.Function):
    """-factor · sum of log p(label) over tokens, from hidden states [N, H] and the head's weight [V, H] (and bias
    [V]), `chunk` tokens at a time, with every gradient computed in the forward (the module docstring says why)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, factor, softcap, chunk, kernel, sums: HeadGradients):
        need_h = hidden.requires_grad
        need_w, need_b = weight.requires_grad, bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_h else None
        total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            loss, logit_grad, bias_grad = kernel(hidden[part], weight, bias, labels[part], factor, softcap)
            total += loss
            if need_h:
                torch.matmul(logit_grad, weight, out=grad_hidden[part])
            sums.add(logit_grad, bias_grad, hidden[part], need_w, need_b, weight)
        if need_w or need_b:
            sums.pending += 1
        ctx.save_for_backward(grad_hidden)
        ctx.sums, ctx.need_weights = sums, need_w or need_b
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        weight_grad = bias_grad = None
        if ctx.need_weights:
            weight_grad, bias_grad = ctx.sums.take(grad_out, ctx.bias_dtype)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        return grad_hidden, weight_grad, bias_grad, None, None, None, None, None, None


class ChunkedHead:
    """The LM head applied inside the loss: `token_logps(hidden [R, S, H], labels [R, S])` -> [R, S] fp32 (chunks
    recomputed in the backward), and `token_loss(hidden, labels, factor)` -> the scaled token loss (gradients
    computed in the forward)."""

    def __init__(self, head: torch.nn.Linear, softcap: float | None, chunk: int | None = None, compiled=False):
        self.head, self.softcap = head, softcap or None
        self.chunk = chunk or chunk_tokens_for(head.weight.shape[0])
        kernels = (_chunk_forward, _chunk_logit_grad, _chunk_loss_and_grad)
        self.kernels = tuple(torch.compile(k, dynamic=True) for k in kernels) if compiled else kernels
        self.sums = HeadGradients()

    def token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, factor) -> torch.Tensor:
        """-factor · the sum of the label tokens' log-probabilities (fp32 scalar): the token loss, its gradients
        computed in the forward where a backward will follow."""
        if not torch.is_grad_enabled():
            return -self.token_logps(hidden, labels).sum() * factor
        flat = hidden.reshape(-1, hidden.shape[-1])
        wide = torch.promote_types(self.head.weight.dtype, torch.float32)
        factor = torch.as_tensor(factor, dtype=wide, device=hidden.device)
        args = (flat, self.head.weight, self.head.bias, labels.reshape(-1), factor, self.softcap, self.chunk)
        return ChunkedTokenLoss.apply(*args, self.kernels[2], self.sums)

    def token_logps(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logps = ChunkedTokenLogps.apply(
            flat, self.head.weight, self.head.bias, labels.reshape(-1), self.softcap, self.chunk, self.kernels
        )
        return logps.view(labels.shape)


# --chunked-loss auto: on once one micro-batch's fp32 logits would exceed this. High enough that the shapes measured
# with the plain loss (bench/RESULTS.md, up to 3.3 GB of logits) keep it until the chunks are measured as fast.
AUTO_BYTES = 4 << 30


def micro_batch_tokens(job: JobConfig) -> int:
    """Tokens of one micro-batch on one rank: a preference pair is two rows, a cp rank holds its share of each."""
    rows = job.data.micro_batch_size * (2 if job.objective.preference else 1)
    return rows * job.data.seq_length // job.dist.context_size


def uses_chunked_loss(job: JobConfig, vocab_size: int) -> bool:
    """--chunked-loss on, or auto with more than AUTO_BYTES of fp32 logits in one micro-batch."""
    setting = job.model.chunked_loss
    return setting == "on" or (setting == "auto" and micro_batch_tokens(job) * vocab_size * 4 > AUTO_BYTES)


def attach_chunked_head(stages, job: JobConfig) -> ChunkedHead | None:
    """--chunked-loss for this rank's stages: where one of them is the last, make it return hidden states and give
    the loss its head (None where the loss takes logits)."""
    last = next((stage for stage in stages if stage.is_last), None)
    if last is None or not uses_chunked_loss(job, last.cfg.vocab_size):
        return None
    last.head_in_loss = True
    return ChunkedHead(last.output_layer, last.cfg.final_softcap, compiled=job.model.compile)
