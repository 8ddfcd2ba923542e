"""Model families (GPT-NeoX, GPT-J, Llama) as pipeline-stage building blocks, with Hugging Face parameter names.

    cfg = load_model_config(model_dir)                       # config.json -> ModelConfig
    stage = build_stage(cfg, 0, 8, is_first=True, is_last=False)
    load_stage_weights(stage, model_dir)                     # or init_stage_weights(stage, cfg, seed)
    hidden = stage(input_ids)

Reading order: config.py, seeding.py (per-tensor seeds), layers.py, varlen.py (packed documents on varlen flash
attention), gptneox.py / gptj.py / llama.py, stage.py, weights.py, flops.py, export.py,
lora.py (LoRA adapters on a stage, peft's adapter files), fp8.py (torchao float8 linears in the blocks).
"""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelError, load_model_config, model_config_from_dict
from .export import save_hf_directory
from .flops import count_lora_parameters, count_parameters, flops_per_token, head_cost_in_layers, lora_flops_per_token
from .fp8 import check_fp8_device, convert_blocks_to_float8, float8_summary, gains_from_float8
from .layers import attention_backend
from .lora import (
    LoraConfig,
    LoraLinear,
    adapters_off,
    apply_lora,
    init_lora_weights,
    load_lora_tensors,
    load_peft_adapter,
    lora_parameters,
    lora_state_dict,
    make_lora_config,
    merge_lora_tensors,
    quantize_base,
    resolve_target_modules,
    save_peft_adapter,
)
from .stage import (
    Stage,
    build_rank_stages,
    build_stage,
    embedding_name,
    head_name,
    materialize_stage,
    tied_parameter_names,
)
from .varlen import varlen_chosen, varlen_note
from .weights import Checkpoint, expected_names, expected_shapes, init_stage_weights, load_stage_weights

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "attention_backend",
    "varlen_chosen",
    "varlen_note",
    "adapters_off",
    "apply_lora",
    "Checkpoint",
    "ModelConfig",
    "ModelError",
    "Stage",
    "build_rank_stages",
    "build_stage",
    "check_fp8_device",
    "convert_blocks_to_float8",
    "count_lora_parameters",
    "count_parameters",
    "embedding_name",
    "expected_names",
    "expected_shapes",
    "float8_summary",
    "flops_per_token",
    "gains_from_float8",
    "head_cost_in_layers",
    "head_name",
    "init_lora_weights",
    "init_stage_weights",
    "load_lora_tensors",
    "load_model_config",
    "load_peft_adapter",
    "LoraConfig",
    "LoraLinear",
    "lora_flops_per_token",
    "lora_parameters",
    "lora_state_dict",
    "make_lora_config",
    "merge_lora_tensors",
    "resolve_target_modules",
    "save_peft_adapter",
    "load_stage_weights",
    "materialize_stage",
    "save_hf_directory",
    "model_config_from_dict",
    "quantize_base",
    "tied_parameter_names",
]
