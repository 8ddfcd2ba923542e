"""The memory plan of a rank, before the model load: what its stages' weights, gradients and optimizer state take on
the GPU (exact element counts, from stages built on the meta device), and an estimate of the activations held
between forward and backward and of the loss path's logits. Printed at start-up; a rank whose weights, gradients
and optimizer state alone exceed its GPU is refused in one line naming the flags that make it fit (that much is
certain to run out of memory; the activation estimate only warns, since kernels and the allocator vary).

Activations per token and layer, in the model dtype: about 6 x hidden + 4 x intermediate values without
checkpointing (the inputs of the norms, projections, attention and MLP that the backward reads; SDPA keeps no
scores), the block input alone (hidden) with checkpointing, nothing on the GPU once offloaded; a checkpointed run
also recomputes one block at a time; --tiled-mlp cuts the MLP's 4 x intermediate to one tile's worth. Micro-batches
in flight: one at pp=1, all of them under GPipe, up to the number of stages after this one under 1F1B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import modules
from config import JobConfig
from modules.tiled_mlp import TILE_TOKENS
from pipeline_parallel import StagePlan
from training.chunked_logps import CHUNK_ELEMENTS, micro_batch_tokens, uses_chunked_loss
from utils.errors import UserError

GB = 2**30
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 * 4 / 4, "int8": 1.0 + 4 / 4096}  # per element, with the absmax scales


class MemoryPlanError(UserError):
    pass


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    activations: float  # held between forward and backward, every micro-batch in flight
    working: float  # one block recomputed (checkpointing) and the loss path's logits of one micro-batch
    in_flight: int
    chunked: bool

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations + self.working

    def line(self, capacity: float | None) -> str:
        parts = [
            f"weights {self.weights / GB:.1f}",
            f"gradients {self.gradients / GB:.1f}",
            f"optimizer {self.optimizer / GB:.1f}",
            f"activations ~{self.activations / GB:.1f} ({self.in_flight} micro-batch(es) in flight)",
            f"recompute and logits ~{self.working / GB:.1f}{' (chunked loss)' if self.chunked else ''}",
        ]
        of = f" of {capacity / GB:.1f}" if capacity else ""
        return f"memory plan (GB on this rank): {', '.join(parts)}; ~{self.total / GB:.1f}{of}"


def plan_memory(job: JobConfig, cfg: modules.ModelConfig, plan: StagePlan, pp_size: int, dp_size: int, lora=None):
    """The MemoryPlan of a rank running `plan` (its stage ids), for `job`'s settings."""
    model = job.model
    dtype_bytes = torch.finfo(getattr(torch, model.dtype)).bits // 8
    weights = gradients = trained = 0.0
    for s in plan.stage_ids:
        with torch.device("meta"):
            stage = modules.build_stage(cfg, *plan.bounds[s], s == 0, s == plan.num_stages - 1)
            if lora is not None:
                modules.apply_lora(stage, lora, seed=None)
        for name, p in stage.named_parameters():
            quantized = job.lora.quantize_base != "none" and not p.requires_grad and _in_block_linear(name, p)
            weights += p.numel() * (QUANTIZED_BYTES[job.lora.quantize_base] if quantized else dtype_bytes)
            if p.requires_grad:
                gradients += p.numel() * dtype_bytes
                trained += p.numel()
    optimizer = 0.0
    if job.optimizer.offload == "none":
        master = 4 if dtype_bytes < 4 else 0
        state = 2 if job.optimizer.kind == "8bit-adam" else 8
        share = dp_size if job.optimizer.dp_mode == "sharded" and dp_size > 1 else 1
        optimizer = trained * (master + state) / share

    tokens = micro_batch_tokens(job)
    layers = sum(end - start for start, end in (plan.bounds[s] for s in plan.stage_ids))
    # --tiled-mlp: the MLP's intermediates (4 x intermediate per token) exist for one tile at a time, never held
    tiled = model.tiled_mlp == "on" and tokens > TILE_TOKENS
    mlp_values = 4 * cfg.intermediate_size
    held_block = dtype_bytes * (6 * cfg.hidden_size + (0 if tiled else mlp_values))
    checkpointed = {"none": 0.0, "selective": 0.5, "full": 1.0}[model.activation_checkpointing]
    kept_input = 0 if model.activation_offload == "cpu" else dtype_bytes * cfg.hidden_size
    per_token = layers * (checkpointed * kept_input + (1 - checkpointed) * held_block)
    in_flight = _in_flight(job, plan, pp_size)
    activations = per_token * tokens * in_flight
    recomputed = dtype_bytes * (6 * cfg.hidden_size * tokens + mlp_values * (TILE_TOKENS if tiled else tokens))
    working = recomputed if checkpointed else 0.0
    chunked = plan.holds_last and uses_chunked_loss(job, cfg.vocab_size)
    if plan.holds_last:  # model-dtype logits, their fp32 log-softmax and its gradient; chunks of fixed size
        working += 10 * (CHUNK_ELEMENTS if chunked else tokens * cfg.vocab_size)
    return MemoryPlan(weights, gradients, optimizer, activations, working, in_flight, chunked)


def check_memory_plan(
    job: JobConfig,
    cfg: modules.ModelConfig,
    plan: StagePlan,
    layout,
    lora,
    log: Callable[[str], None],
    capacity: int | None = None,
) -> MemoryPlan:
    """Log this rank's plan against its GPU's `capacity` (bytes; the device's own by default, nothing on a CPU),
    refuse a rank whose static memory cannot fit, warn where the whole estimate is over."""
    estimate = plan_memory(job, cfg, plan, layout.pp_size, layout.dp_size, lora)
    if capacity is None:
        if layout.device.type != "cuda":
            return estimate
        capacity = torch.cuda.get_device_properties(layout.device).total_memory
    log(estimate.line(capacity))
    if estimate.static > capacity:
        raise MemoryPlanError(
            f"this rank's weights, gradients and optimizer state alone need {estimate.static / GB:.1f} GB and its "
            f"GPU holds {capacity / GB:.1f} GB; {_static_fixes(job, layout)}"
        )
    if estimate.total > capacity:
        log(
            f"WARNING: the memory plan estimates {estimate.total / GB:.1f} GB of {capacity / GB:.1f} GB; if it runs "
            f"out of memory: {_activation_fixes(job, estimate)}"
        )
    return estimate


def _in_block_linear(name: str, p: torch.nn.Parameter) -> bool:
    """A base weight of a block's linear layer: what --quantize-base holds in bitsandbytes."""
    return (".layers." in name or ".h." in name) and p.dim() == 2 and "lora_" not in name


def _in_flight(job: JobConfig, plan: StagePlan, pp_size: int) -> int:
    micro = job.pipeline.micro_batches
    if pp_size == 1:
        return 1
    if job.pipeline.mode == "gpipe":
        return micro
    return min(micro, plan.num_stages - min(plan.stage_ids))


def _static_fixes(job: JobConfig, layout) -> str:
    fixes = []
    if not job.lora.enabled:
        if job.optimizer.offload == "none":
            fixes.append("--offload-optimizer cpu (fp32 master weights and Adam state in host memory)")
            if job.optimizer.kind != "8bit-adam":
                fixes.append("--optimizer 8bit-adam")
            if job.optimizer.dp_mode != "sharded" and layout.dp_size > 1:
                fixes.append("--dp-mode sharded")
        fixes.append("LoRA adapters (--lora-r 16)")
    elif job.lora.quantize_base == "none":
        fixes.append("--quantize-base nf4")
    fixes.append("more pipeline stages (--pipeline-group-size)")
    return "use " + ", or ".join(fixes)


def _activation_fixes(job: JobConfig, estimate: MemoryPlan) -> str:
    fixes = []
    if job.model.activation_checkpointing != "full":
        fixes.append("--activation-checkpointing full")
    elif job.model.activation_offload == "none":
        fixes.append("--activation-offload cpu")
    if not estimate.chunked:
        fixes.append("--chunked-loss on")
    if job.model.tiled_mlp == "off" and micro_batch_tokens(job) > TILE_TOKENS:
        fixes.append("--tiled-mlp on")
    if job.data.micro_batch_size > 1:
        fixes.append("a smaller --micro-batch-size")
    if job.pipeline.mode == "gpipe" and estimate.in_flight > 1:
        fixes.append("--pp-mode 1f1b")
    return ", ".join(fixes) or "more pipeline stages (--pipeline-group-size)"
