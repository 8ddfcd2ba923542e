"""Pieces shared by the families: rotary embedding, causal attention (document masks, sliding windows, soft-capped
logits), RMSNorm (Llama's and Gemma's), activations.

Rotary follows Hugging Face exactly: cos/sin are computed in float32 from float32 inverse frequencies, then cast to
the activation dtype (as transformers does), once per stage forward and reused by every block of the stage.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from context_parallel import ContextMask, gather_sequence

from .config import ModelConfig
from .varlen import VarlenMask, varlen_applies


def rotary_inv_freq(cfg: ModelConfig, device: torch.device | str | None = "cpu", local: bool = False) -> torch.Tensor:
    """float32 inverse frequencies [rotary_dim // 2], with linear or llama3 scaling as transformers computes them;
    `local`: the sliding layers' rotary of a model that gives them their own (Gemma 3)."""
    dim = cfg.rotary_dim
    theta, scaling = (cfg.local_rope_theta, cfg.local_rope_scaling) if local else (cfg.rope_theta, cfg.rope_scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(nn.Module):
    """Produces (cos, sin) [1 or B, 1, S, rotary_dim] for a stage; `interleaved` is GPT-J's every-two layout."""

    def __init__(self, cfg: ModelConfig, interleaved: bool, local: bool = False):
        super().__init__()
        self.cfg = cfg
        self.interleaved, self.local = interleaved, local
        self.register_buffer("inv_freq", rotary_inv_freq(cfg, "cpu", local), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.to(bf16)`, `.to_empty()` or meta init would cast or wipe inv_freq: recompute it in float32 on the new
        # device.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rotary_inv_freq(self.cfg, self.inv_freq.device, self.local)
        return self

    def forward(self, seq_len: int, dtype: torch.dtype, position_ids: torch.Tensor | None = None):
        inv_freq = self.inv_freq
        if position_ids is None:
            positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)[None]
        else:
            positions = position_ids.to(device=inv_freq.device, dtype=torch.float32)
        freqs = positions[..., None] * inv_freq  # [B, S, rotary_dim // 2]
        if self.interleaved:
            emb = torch.repeat_interleave(freqs, 2, dim=-1)  # f0 f0 f1 f1 ...
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x [B, H, S, D]; the rest pass through (partial rotary)."""
    rotary_dim = cos.shape[-1]
    rotate = _rotate_every_two if interleaved else _rotate_half
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """A context in which SDPA tries backend `name` first and falls back to the others where it does not apply
    (a head size it lacks, a CPU); "auto" keeps torch's own order. Blocks compiled inside it use it too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    order = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    first = order.pop(name)
    return sdpa_kernel([first, *order.values()], set_priority=True)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention on [B, H, S, D] (k/v may have fewer heads: GQA); returns [B, S, H*D]. `mask` None: causal over
    the whole window; a boolean [B|1, 1, S, S] (True: visible; CPU) or a FlexMask (GPU) from `attention_masks`.
    `scale` multiplies the scores (default D ** -0.5); `softcap` squashes them to cap * tanh(score / cap) before
    the mask (Gemma 2): FlexAttention's score_mod on GPUs, the scores written out elsewhere. A ContextMask
    (context parallelism) gathers the keys and values of the whole sequence first; a VarlenMask runs each document
    (or window row) as its own sequence of the flash kernel."""
    if isinstance(mask, VarlenMask):
        return mask.attend(q, k, v, scale)
    if isinstance(mask, ContextMask):
        k, v, mask = gather_sequence(k, mask.context), gather_sequence(v, mask.context), mask.mask
    if isinstance(mask, FlexMask):
        score_mod = _softcap_mod(softcap) if softcap else None
        out = _flex_attention()(
            q, k, v, score_mod=score_mod, block_mask=mask.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    else:
        if k.shape[1] != q.shape[1]:
            # Expand rather than enable_gqa: every SDPA backend (flash, efficient, cuDNN) takes equal head counts.
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if softcap:
            out = _softcapped_attention(q, k, v, mask, scale, softcap)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def _softcapped_attention(q, k, v, mask, scale, softcap):
    """The scores written out (SDPA cannot soft-cap them), as transformers' eager attention computes them."""
    seq = q.shape[-2]
    if mask is None:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _softcap_mod(cap: float):
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


class FlexMask:
    """A FlexAttention block mask, built once per stage forward and shared by the stage's blocks of one kind."""

    block_mask: object


class WindowBlockMask(FlexMask):
    """Causal within a sliding window of `window` positions (a token sees itself and the window - 1 before it),
    and within its document when `doc_ids` are given; blocks outside the band are skipped."""

    def __init__(self, doc_ids: torch.Tensor | None, batch: int, seq: int, window: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        def in_window(b, h, q_idx, kv_idx):
            visible = (q_idx >= kv_idx) & (q_idx - kv_idx < window)
            return visible & (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) if doc_ids is not None else visible

        self.block_mask = create_block_mask(
            in_window, batch if doc_ids is not None else None, None, seq, seq, device=device, _compile=True
        )


class CausalBlockMask(FlexMask):
    """Plain causal attention through FlexAttention: for soft-capped scores, which SDPA cannot apply."""

    def __init__(self, seq: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        self.block_mask = create_block_mask(causal, None, None, seq, seq, device=device, _compile=True)


class DocumentBlockMask(FlexMask):
    """A FlexAttention block mask (GPU): tokens see earlier tokens of their own document. Blocks of the score
    matrix that cross documents are skipped, so short documents cost less than a causal window.

    The block structure is worked out from each 128-token block's lowest and highest document id, a few small
    kernels on [B, S/128, S/128]: `create_block_mask` evaluates the mask on all B x S x S positions through vmap,
    which costs the host several milliseconds of kernel launches per micro-batch while the GPU waits. Document ids
    ascend along a row (tasks/packing.py), so a block pair holds a visible position exactly when its id ranges meet
    and the key block is not after the query block; it is full when both blocks lie inside one document and the key
    block is strictly earlier (the diagonal block is causal inside)."""

    BLOCK = 128

    def __init__(self, doc_ids: torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        batch, seq = doc_ids.shape
        n = -(-seq // self.BLOCK)
        padded = torch.cat([doc_ids, doc_ids[:, -1:].expand(batch, n * self.BLOCK - seq)], dim=1)
        blocks = padded.view(batch, n, self.BLOCK)
        low, high = blocks.amin(-1), blocks.amax(-1)  # [B, n]
        q_low, q_high, kv_low, kv_high = low[:, :, None], high[:, :, None], low[:, None, :], high[:, None, :]
        not_after = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril()
        visible = (kv_low <= q_high) & (q_low <= kv_high) & not_after
        whole = torch.arange(n, device=doc_ids.device) < seq // self.BLOCK  # blocks without padding
        one_document = (low == high) & whole
        full = one_document[:, :, None] & one_document[:, None, :] & (q_low == kv_low) & not_after.tril(-1)

        def same_document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

        self.block_mask = BlockMask.from_kv_blocks(
            *_kv_block_lists(visible & ~full),
            *_kv_block_lists(full),
            BLOCK_SIZE=self.BLOCK,
            mask_mod=same_document_causal,
            seq_lengths=(seq, seq),
        )


def _kv_block_lists(selected: torch.Tensor):
    """BlockMask's sparse form of a [B, n, n] block selection: per query block, how many key blocks and which
    (ascending, the selected ones first), with a head dimension of 1."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


@functools.cache
def _flex_attention():
    """flex_attention compiled once: uncompiled it materialises the whole score matrix. It is compiled per shape
    (training, evaluation, the last short batch, each mask and score kind): room for more than torch.compile's
    default of 8 recompilations, past which it would silently run uncompiled."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(flex_attention, dynamic=False)


def document_mask(doc_ids: torch.Tensor):
    """The attention mask of packed documents `doc_ids` [B, S], built once per stage forward and shared by its
    blocks: a FlexAttention block mask on GPUs, a boolean [B, 1, S, S] mask for SDPA elsewhere."""
    if doc_ids.device.type == "cuda":
        return DocumentBlockMask(doc_ids)
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal


def attention_masks(
    cfg: ModelConfig,
    x: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_lengths: torch.Tensor | None = None,
    varlen: bool = False,
) -> dict[str, object]:
    """{layer type: the mask its blocks take} for a stage's hidden states `x` [B, S, H]: the document mask (or None:
    plain causal) for full layers, the window (within documents) for sliding ones. A window as long as the
    sequence is no window. On a GPU the masks are VarlenMasks with `varlen` where the kernel applies
    (varlen_applies; with `doc_lengths` where there are documents), else FlexAttention block masks where SDPA cannot
    express them (documents, windows, soft-capped scores)."""
    batch, seq, device = x.shape[0], x.shape[1], x.device
    window = cfg.sliding_window if "sliding" in cfg.layer_types and cfg.sliding_window < seq else None
    if varlen and (doc_ids is None or doc_lengths is not None) and varlen_applies(cfg, x.dtype, device):
        full = VarlenMask(doc_lengths, batch, seq, None, device) if doc_ids is not None else None
        masks = {"full": full}
        if "sliding" in cfg.layer_types:
            masks["sliding"] = VarlenMask(doc_lengths, batch, seq, window, device) if window else full
        return masks
    full = document_mask(doc_ids) if doc_ids is not None else None
    if full is None and cfg.attn_softcap and device.type == "cuda":
        full = CausalBlockMask(seq, device)
    masks = {"full": full}
    if "sliding" not in cfg.layer_types:
        return masks
    if window is None:
        masks["sliding"] = full
    elif device.type == "cuda":
        masks["sliding"] = WindowBlockMask(doc_ids, batch, seq, window, device)
    else:
        positions = torch.arange(seq, device=device)
        band = (positions[:, None] >= positions[None, :]) & (positions[:, None] - positions[None, :] < window)
        masks["sliding"] = band if full is None else full & band
    return masks


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (same op order as transformers). With `offset`,
    Gemma's: scale by (1 + weight) in float32, then cast back (its weight starts at zero)."""

    def __init__(self, hidden_size: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    return F.silu
