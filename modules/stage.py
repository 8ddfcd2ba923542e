"""A pipeline stage: [embedding] -> blocks layer_start..layer_end-1 -> [final norm + LM head].

The module tree mirrors Hugging Face's, so `stage.state_dict()` keys are exactly the HF checkpoint keys with global
layer indices (e.g. `gpt_neox.layers.5.attention.dense.weight`): any layout can read any other layout's checkpoint.

Tied embeddings (`tie_word_embeddings`): when one stage holds both ends it shares one Parameter, as transformers
does. When the ends live on different stages, the last stage owns a separate head weight (initialised and loaded
from the embedding); the engine must keep the two in sync, e.g. by summing their gradients across the first and
last stage before the optimizer step. `tied_parameter_names(cfg)` names the pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import nn

from context_parallel import ContextSplit, context_masks

from . import gemma2, gemma3, gptj, gptneox, llama, mistral, phi3, qwen2, qwen3
from .activation_offload import ActivationOffload
from .config import ModelConfig, ModelError
from .layers import Rotary, attention_masks
from .tiled_mlp import tile_mlps

if TYPE_CHECKING:
    from config import ModelRunConfig
    from pipeline_parallel import StagePlan

    from .lora import LoraConfig

FAMILIES = {
    "gptneox": gptneox,
    "gptj": gptj,
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
}
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def family(cfg: ModelConfig):
    return FAMILIES[cfg.model_type]


def head_name(cfg: ModelConfig) -> str:
    """HF name of the LM head weight (`embed_out.weight` for GPT-NeoX, `lm_head.weight` otherwise)."""
    return f"{family(cfg).HEAD}.weight"


def embedding_name(cfg: ModelConfig) -> str:
    fam = family(cfg)
    return f"{fam.PREFIX}.{fam.EMBED}.weight"


def tied_parameter_names(cfg: ModelConfig) -> dict[str, str]:
    """{head weight name: embedding weight name} when the config ties them, else {}."""
    return {head_name(cfg): embedding_name(cfg)} if cfg.tie_word_embeddings else {}


class Stage(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_start: int,
        layer_end: int,
        is_first: bool,
        is_last: bool,
        activation_checkpointing: str = "none",
    ):
        super().__init__()
        if not 0 <= layer_start <= layer_end <= cfg.num_layers:
            raise ModelError(
                f"stage layers [{layer_start}, {layer_end}) are outside the model's {cfg.num_layers} layers"
            )
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ModelError(
                f"activation_checkpointing={activation_checkpointing!r}; expected one of "
                f"{', '.join(ACTIVATION_CHECKPOINTING)}"
            )
        fam = family(cfg)
        self.cfg = cfg
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = is_first, is_last
        self.activation_checkpointing = activation_checkpointing

        # `body` is registered under the family prefix (gpt_neox / transformer / model) to get HF's key names.
        body = nn.Module()
        if is_first:
            setattr(body, fam.EMBED, nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id))
        setattr(body, fam.LAYERS, nn.ModuleDict({str(i): fam.Block(cfg) for i in range(layer_start, layer_end)}))
        if is_last:
            setattr(body, fam.FINAL_NORM, fam.final_norm(cfg))
        self.add_module(fam.PREFIX, body)
        if is_last:
            head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=fam.HEAD_BIAS)
            if is_first and cfg.tie_word_embeddings:
                head.weight = getattr(body, fam.EMBED).weight
            self.add_module(fam.HEAD, head)
        self.rotary = Rotary(cfg, fam.INTERLEAVED_ROTARY)  # holds only the non-persistent inv_freq buffer
        if cfg.local_rope_theta is not None:  # the sliding layers' own rotary (Gemma 3)
            self.rotary_local = Rotary(cfg, fam.INTERLEAVED_ROTARY, local=True)
        self.layer_types = [cfg.layer_type(i) for i in range(layer_start, layer_end)]
        # --chunked-loss: the last stage returns its final-normed hidden states and the loss applies the head
        self.head_in_loss = False
        self.activation_offload: ActivationOffload | None = None  # --activation-offload cpu
        self.context: ContextSplit | None = None  # --context-parallel-size > 1: the rank's share of each sequence
        self.masked_attention = "flex"  # --masked-attention: auto/varlen run documents and windows on varlen attention

    @property
    def output_layer(self) -> nn.Linear:
        """The last stage's LM head (a plain Linear: LoRA, QLoRA and FP8 leave it be)."""
        return getattr(self, family(self.cfg).HEAD)

    @property
    def blocks(self) -> list[nn.Module]:
        """This stage's transformer blocks, in order."""
        fam = family(self.cfg)
        return list(getattr(getattr(self, fam.PREFIX), fam.LAYERS).values())

    def _checkpointed(self, local_index: int) -> bool:
        if self.activation_checkpointing == "full":
            return True
        return self.activation_checkpointing == "selective" and local_index % 2 == 0

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        doc_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: input_ids [B, S] (first stage) or hidden [B, S, H]; returns logits [B, S, V] (last; with `head_in_loss`
        the final-normed hidden states, which the loss takes through the head) or hidden. Under context parallelism
        x holds this rank's tokens only (ContextSplit.split) while `position_ids` and `doc_ids` describe the whole
        sequences.
        `position_ids` [B, S] (default 0..S-1) place the rotary embedding; with `doc_ids` [B, S] a token attends
        only to earlier tokens of its own document (packed documents), else to every earlier token (a sliding
        layer: of its window); `doc_lengths` [B, K] (tasks.packing.document_lengths of the same rows) let a GPU run
        the documents through varlen flash attention under --masked-attention varlen."""
        cfg, fam = self.cfg, family(self.cfg)
        body = getattr(self, fam.PREFIX)
        h = getattr(body, fam.EMBED)(x) if self.is_first else x
        if self.is_first and cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the model dtype, as transformers does
            h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype)
        blocks = getattr(body, fam.LAYERS)
        if len(blocks):
            if self.context is not None:  # this rank's tokens of sequences split over its cp group
                seq = h.shape[1] * self.context.size
                mine = self.context.local_index(seq, h.device)
                position_ids = position_ids[:, mine] if position_ids is not None else mine[None]
                masks = context_masks(cfg, self.context, seq, doc_ids, h.device)
            else:
                masks = attention_masks(cfg, h, doc_ids, doc_lengths, varlen=self.masked_attention != "flex")
            # Once per stage, shared by its blocks: rotary and mask per layer type
            rotary = {"full": self.rotary(h.shape[1], h.dtype, position_ids)}
            rotary["sliding"] = (
                self.rotary_local(h.shape[1], h.dtype, position_ids)
                if hasattr(self, "rotary_local")
                else rotary["full"]
            )
            offload = self.activation_offload if torch.is_grad_enabled() else None
            offloaded = offload.new_pass() if offload is not None else None
            for i, block in enumerate(blocks.values()):
                kind = self.layer_types[i]
                (cos, sin), mask = rotary[kind], masks[kind]
                if self._checkpointed(i) and torch.is_grad_enabled():
                    with offload.hooks(offloaded) if offload is not None else contextlib.nullcontext():
                        h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, mask, use_reentrant=False)
                else:
                    h = block(h, cos, sin, mask)
        if self.is_last and self.head_in_loss:
            return getattr(body, fam.FINAL_NORM)(h)
        if self.is_last:
            h = getattr(self, fam.HEAD)(getattr(body, fam.FINAL_NORM)(h))
            if cfg.final_softcap:
                h = cfg.final_softcap * torch.tanh(h / cfg.final_softcap)
        return h

    def extra_repr(self) -> str:
        return (
            f"model_type={self.cfg.model_type}, layers=[{self.layer_start}, {self.layer_end}), "
            f"is_first={self.is_first}, is_last={self.is_last}, "
            f"activation_checkpointing={self.activation_checkpointing}"
        )


def build_stage(
    cfg: ModelConfig,
    layer_start: int,
    layer_end: int,
    is_first: bool,
    is_last: bool,
    activation_checkpointing: str = "none",
) -> Stage:
    """A stage module holding blocks [layer_start, layer_end), plus the embedding if first and head if last.

    Parameters are created in torch's default dtype/device (use `.to()` or a `torch.device(...)` context);
    weights are placeholders until `init_stage_weights` or `load_stage_weights`.
    """
    return Stage(cfg, layer_start, layer_end, is_first, is_last, activation_checkpointing)


def materialize_stage(stage: Stage, device: torch.device, dtype: torch.dtype) -> Stage:
    """Allocate a stage built on the meta device directly as `dtype` on `device` (no full-size fp32 copy on the
    host first), re-tying a shared head: to_empty() gives each module its own new Parameter."""
    stage = stage.to(dtype=dtype).to_empty(device=device)
    fam = family(stage.cfg)
    if stage.is_first and stage.is_last and stage.cfg.tie_word_embeddings:
        getattr(stage, fam.HEAD).weight = getattr(getattr(stage, fam.PREFIX), fam.EMBED).weight
    return stage


def build_rank_stages(
    cfg: ModelConfig,
    run: ModelRunConfig,
    plan: StagePlan,
    device: torch.device,
    lora: LoraConfig | None = None,
    quantize_base: str = "none",
    adapter_tensors: dict[str, torch.Tensor] | None = None,
    show_progress: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> list[Stage]:
    """This rank's stages of `plan` (plan.stage_ids of the split plan.bounds), allocated once on `device` in the run's
    dtype, holding the weights of run.model_dir (or, without --load-pretrained-model, a random init from run.seed),
    each transformer block compiled if run.compile.

    With `lora` the blocks' target linears get adapters (initialised from run.seed, or copied from
    `adapter_tensors`) and every base weight is frozen; `quantize_base` (nf4 | int8) then holds the base linears in
    bitsandbytes. A quantised stage is loaded on the host and quantised onto `device` linear by linear, so the device
    never holds the stage's full-precision weights.

    run.fp8 (tensorwise | rowwise) swaps the blocks' large linears for torchao's Float8Linear (same parameter names
    and dtypes), before torch.compile so that the compiled blocks fuse the float8 casts. `on_phase(name)` is called
    as each stage is allocated ("model_build") and as its weights are in ("weights"), for the trainer's start-up
    timing. run.activation_offload (cpu) moves the checkpointed blocks' saved inputs to host memory; run.tiled_mlp
    (on) runs each block's MLP a tile of tokens at a time."""
    from .fp8 import convert_blocks_to_float8
    from .lora import apply_lora, init_lora_weights, load_lora_tensors
    from .lora import quantize_base as quantize
    from .weights import init_stage_weights, load_stage_weights

    load_device = torch.device("cpu") if quantize_base != "none" else device
    dtype = getattr(torch, run.dtype)
    weights_dir, seed = (run.model_dir if run.load_pretrained else None), run.seed
    on_phase = on_phase or (lambda name: None)
    stages = []
    for s in plan.stage_ids:
        start, end = plan.bounds[s]
        is_last = s == len(plan.bounds) - 1
        with torch.device("meta"):  # no full-size fp32 copy on the host first
            stage = build_stage(cfg, start, end, s == 0, is_last, run.activation_checkpointing)
            if lora is not None:
                apply_lora(stage, lora, seed=None)
        stage = materialize_stage(stage, load_device, dtype)
        on_phase("model_build")
        if weights_dir is not None:
            load_stage_weights(stage, weights_dir, is_logger=show_progress)
        else:
            init_stage_weights(stage, cfg, seed)
        if lora is not None:
            init_lora_weights(stage, seed)
            if adapter_tensors is not None:
                load_lora_tensors(stage, adapter_tensors)
            if quantize_base != "none":
                quantize(stage, quantize_base, compute_dtype=dtype, device=device)
                stage = stage.to(device)
        if run.tiled_mlp == "on":
            tile_mlps(stage.blocks)
        if run.fp8 != "none":
            convert_blocks_to_float8(stage, run.fp8)
        if run.compile:
            for block in stage.blocks:
                block.compile()
        if run.activation_offload == "cpu":
            stage.activation_offload = ActivationOffload(device)
        stage.masked_attention = run.masked_attention
        on_phase("weights")
        stages.append(stage)
    return stages
