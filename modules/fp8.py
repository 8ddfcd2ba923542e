"""Float8 training of the blocks' linear layers through torchao (`--fp8 tensorwise|rowwise`).

    check_fp8_device(device)             # before the model load: one line when the GPU cannot run it
    names = convert_blocks_to_float8(stage, "tensorwise")   # after the weights are in, before torch.compile

torchao's `Float8Linear` replaces an `nn.Linear` and keeps its `weight` and `bias` Parameters in the model's dtype
(bf16); each matmul casts its operands to float8 with dynamic scales (one per tensor, or one per row). So the
stage's state_dict keys and dtypes do not change: checkpoints of an fp8 run are those of a bf16 run, either can
resume the other, and the optimizer keeps its fp32 masters of the same bf16 weights.

Only the transformer blocks are converted, never the embedding or the LM head (torchtitan does the same: the head's
output feeds the loss directly and float8 costs accuracy there). Within the blocks, a linear is converted when its
dimensions are multiples of 16 (a float8 matmul needs them) and large enough for the float8 matmul to win over the
extra casts; see `gains_from_float8`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelError
from .stage import Stage

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores
TORCHAO_MISSING = "float8 training needs torchao: pip install torchao"  # config/rules.py checks it is installed
GPU_NEEDED = "--fp8 needs an NVIDIA GPU with compute capability 8.9+ (H100/L4/RTX 4090)"


def check_fp8_device(device: torch.device) -> None:
    """Raise ModelError when `device` cannot run float8 matmuls; before the model load, so it costs seconds."""
    if device.type != "cuda":
        raise ModelError(f"{GPU_NEEDED}; this run has no CUDA device ({device.type})")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise ModelError(
            f"{GPU_NEEDED}; this machine has {torch.cuda.get_device_name(device)} (compute capability "
            f"{major}.{minor}); drop --fp8"
        )


def gains_from_float8(out_features: int, in_features: int, recipe: str) -> bool:
    """Whether a linear [out, in] is worth running in float8 under `recipe` (torchao 0.18's `auto_filter`
    thresholds, from its H100 tables, which torchtitan uses as well).

    A float8 linear pays for casting its input, weight and gradients to float8 (and for finding their scales)
    before each matmul; that is a fixed cost per element while the matmul's gain grows with its size, so small
    matmuls lose. Rowwise scaling casts more (a scale per row) and needs bigger matmuls to break even. Measured on
    one H200 (compiled, a GPT-NeoX block's four linears): tensorwise 1.24x bf16 at hidden 2048, 1.57x at 4096;
    rowwise 0.94x at 2048 (where these thresholds keep half of its linears in bf16), 1.29x at 4096."""
    if out_features % 16 or in_features % 16:
        return False
    if recipe == "tensorwise":
        return not (in_features <= 4096 and out_features <= 1024)
    if recipe == "rowwise":
        return not (out_features <= 2048 or in_features <= 1024 or (out_features <= 4096 and in_features <= 2048))
    raise ModelError(f"--fp8 {recipe!r} is not a float8 recipe; use one of {', '.join(RECIPES)}")


def convert_blocks_to_float8(stage: Stage, recipe: str, emulate: bool = False) -> list[str]:
    """Swap the blocks' linears that gain (see `gains_from_float8`) for torchao's Float8Linear, in place; returns
    their names (the stage's HF names, which do not change). Call it after the weights are loaded and before the
    blocks are compiled. `emulate` runs the float8 casts without float8 matmuls (for tests on CPU)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ModelError(f"--fp8 {recipe}: torchao cannot be imported ({e}); {TORCHAO_MISSING}") from None

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        import dataclasses

        config = dataclasses.replace(config, emulate=True)

    def chosen(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Linear and gains_from_float8(module.out_features, module.in_features, recipe)

    for block in stage.blocks:
        convert_to_float8_training(block, config=config, module_filter_fn=chosen)
    return [name for name, module in stage.named_modules() if _is_float8(module)]


def _is_float8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"  # torchao keeps the class out of its public API


def float8_summary(stages: list[Stage], recipe: str) -> str:
    """One log line: how many of the blocks' linears run in float8 (the rest are too small to gain)."""
    linears = [m for stage in stages for block in stage.blocks for m in block.modules() if isinstance(m, nn.Linear)]
    in_float8 = sum(_is_float8(m) for m in linears)
    return (
        f"fp8 {recipe}: {in_float8} of {len(linears)} block linears in float8 (the rest too small to gain); "
        f"embedding and head in bf16"
    )
