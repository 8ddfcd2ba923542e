"""The optimizer step of a pipeline stage: see stage_optimizer.py (master weights, clipping, schedules) and
scaler.py (fp16 loss scaling), offload.py (the host step of --offload-optimizer cpu), one_pass.py (the GPU step of
16-bit weights with fp32 masters, one triton kernel)."""

from .stage_optimizer import (
    OptimizerError,
    StageOptimizer,
    check_available,
    check_host_memory,
    lr_multiplier,
    no_decay,
)

__all__ = ["OptimizerError", "StageOptimizer", "check_available", "check_host_memory", "lr_multiplier", "no_decay"]
