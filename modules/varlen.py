"""Packed documents and sliding windows on torch's varlen flash attention (`--masked-attention varlen`).

Every document of every row is a sequence of its own, so cross-document blocks cost nothing and nothing is
compiled: the first step loads no inductor, which FlexAttention's kernel needs.

FlashAttention-2's backward adds up each query's gradient over the key blocks with atomic adds, in an order that
changes from run to run, unless torch's deterministic mode is on when it runs. Training here repeats bit for bit (a
resumed run continues the uninterrupted one exactly), so the backward runs with that mode switched on for this one
call. It is built from the two private ops torch's own `varlen_attn` is made of (`torch_attn::_varlen_attn` and
`torch_attn::_varlen_attn_backward`, the same in torch 2.11 and 2.13), wrapped in custom ops of ours that
torch.compile keeps as opaque calls; where a torch lacks them, varlen does not apply and the usual masks run.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig

OP_NAMESPACE = "chat_lm_finetune"


class VarlenMask:
    """The varlen sequences of a batch. `doc_lengths` [B, K] are the rows' document lengths in order, zero-padded
    (tasks.packing.document_lengths, counted on the host: the number of sequences must be known without asking the
    device); None: one sequence per row. `window`: a token sees itself and the window - 1 tokens before it, within
    its document."""

    def __init__(self, doc_lengths: torch.Tensor | None, batch: int, seq: int, window: int | None, device):
        if doc_lengths is None:
            ends = torch.arange(1, batch + 1, dtype=torch.int32, device=device) * seq
        else:
            ends = doc_lengths.flatten().cumsum(0, dtype=torch.int32)
        self.cu_seqlens = F.pad(ends, (1, 0))
        self.window = [-1, 0] if window is None else [window - 1, 0]
        self.repeat_kv = not _register_ops().takes_gqa  # looked up here: compiled blocks only read it

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, S, H*D]."""
        b, h, s, d = q.shape
        if k.shape[1] != h and self.repeat_kv:
            k, v = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))

        def tokens(x):  # [B, H, S, D] -> [B*S, H, D]; free when x was made as [B, S, H, D] and transposed
            return x.transpose(1, 2).reshape(b * s, x.shape[1], d)

        attention = getattr(torch.ops, OP_NAMESPACE).varlen_attention
        out, _, _ = attention(tokens(q), tokens(k), tokens(v), self.cu_seqlens, s, scale, self.window)
        return out.reshape(b, s, h * d)


@contextlib.contextmanager
def deterministic_kernels():
    """torch's deterministic mode (strict: FlashAttention reads only that) for the calls inside, then as it was.
    The mode is process-wide: held only around one kernel call, while the trainer's other threads (data, checkpoint
    writes) run no kernels it would refuse. Uninitialised memory stays unfilled: the kernel writes every gradient
    it returns."""
    was_on, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


class _Ops:
    def __init__(self, takes_gqa: bool):
        self.takes_gqa = takes_gqa  # torch 2.13's op takes fewer key/value heads than query heads


@functools.cache
def _register_ops() -> _Ops | None:
    """Registers `varlen_attention` (forward: out, lse, rng state) and its deterministic backward once; None where
    this torch has no varlen ops to build them from."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn)

        forward_op = torch.ops.torch_attn._varlen_attn.default
        backward_op = torch.ops.torch_attn._varlen_attn_backward.default
    except (ImportError, AttributeError, RuntimeError):
        return None
    takes_gqa = "enable_gqa" in {arg.name for arg in forward_op._schema.arguments}

    def forward(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, scale: float | None, window: list[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        causal = window == [-1, 0]
        return forward_op(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal, scale, window, **gqa)

    attention = torch.library.custom_op(f"{OP_NAMESPACE}::varlen_attention", mutates_args=())(forward)
    attention.register_fake(forward)  # torch's op answers for fake tensors too

    @torch.library.custom_op(f"{OP_NAMESPACE}::varlen_attention_backward", mutates_args=())
    def attention_backward(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        cu_seqlens: Tensor,
        max_len: int,
        rng_state: Tensor,
        scale: float | None,
        window: list[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        causal = window == [-1, 0]
        with deterministic_kernels():
            return backward_op(
                grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_len, max_len, causal, rng_state, scale, window
            )

    @attention_backward.register_fake
    def _(grad_out, q, k, v, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, max_len, scale, window = inputs
        out, lse, rng_state = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state)
        ctx.max_len, ctx.scale, ctx.window = max_len, scale, window

    def backward(ctx, grad_out, grad_lse, grad_rng_state):
        q, k, v, out, lse, cu_seqlens, rng_state = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_len, rng_state, ctx.scale, ctx.window
        )
        return dq, dk, dv, None, None, None, None

    attention.register_autograd(backward, setup_context=setup_context)
    return _Ops(takes_gqa)


@functools.cache
def _varlen_attention_available(device_index: int) -> bool:
    """torch's varlen flash ops with sliding windows (torch >= 2.11) on an Ampere or newer GPU."""
    return _register_ops() is not None and torch.cuda.get_device_capability(device_index) >= (8, 0)


def varlen_applies(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a stage's attention can run on the varlen flash kernel: a half-precision model on a recent GPU, no
    soft-capped scores (the kernel cannot squash them), a head size the kernel takes."""
    return (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and not cfg.attn_softcap
        and cfg.head_dim % 8 == 0
        and cfg.head_dim <= 256
        and _varlen_attention_available(device.index if device.index is not None else torch.cuda.current_device())
    )


def varlen_chosen(choice: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, context) -> bool:
    """Whether a run's stages take packed documents through varlen attention (and so need their lengths):
    --masked-attention `choice` auto or varlen, where the kernel applies, without context parallelism (`context`:
    the stages' split, None without)."""
    return choice != "flex" and context is None and varlen_applies(cfg, dtype, device)


def varlen_note(choice: str, chosen: bool) -> str | None:
    """The log line of --masked-attention `choice` where varlen_chosen said `chosen`: that the stages run on varlen
    attention, or, where they cannot and varlen was asked for by name, a warning; None where auto (or flex) takes
    FlexAttention."""
    if chosen:
        return "attention: packed documents and sliding windows on varlen flash attention"
    if choice != "varlen":
        return None
    return (
        "WARNING: --masked-attention varlen does not apply here (it needs a bf16/fp16 model on a GPU, no "
        "soft-capped scores, no context parallelism): its usual masks instead"
    )
