"""Parameter and FLOP counts for MFU (GUIDE §5): 6·N_nonembedding + 12·L·d·S per token; with LoRA (issue 14)
4·N_base + 6·N_lora + 12·L·d·S."""

from __future__ import annotations

import math

from .config import ModelConfig
from .lora import LoraConfig, expected_adapter_shapes
from .stage import embedding_name, head_name
from .weights import expected_shapes


def count_parameters(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of the full model; a tied head is counted once (as the embedding)."""
    shapes = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        del shapes[head_name(cfg)]
    if not include_embedding:
        del shapes[embedding_name(cfg)]
        if cfg.tie_word_embeddings:  # the head matmul still runs: count it as non-embedding compute
            shapes[head_name(cfg)] = (cfg.vocab_size, cfg.hidden_size)
    return sum(math.prod(shape) for shape in shapes.values())


def attention_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """12·L·(heads·head_dim)·S: the score and value matmuls, forward and backward, over the whole window (non-causal,
    as the MFU convention counts them; sliding-window layers too). heads·head_dim is the hidden size except where a
    family sets head_dim apart (Qwen3, Gemma)."""
    return 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_length


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6·N (forward + backward of every matmul) + 12·L·d·S (attention scores).

    N excludes the input embedding table (a lookup, no matmul) but includes the LM head, as torchtitan does.
    """
    n = count_parameters(cfg, include_embedding=False)
    return 6 * n + attention_flops_per_token(cfg, seq_length)


def head_cost_in_layers(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token of the LM head over those of one transformer layer (same terms as
    flops_per_token), to balance pipeline stages: the last stage runs the head on top of its layers."""
    head = cfg.vocab_size * cfg.hidden_size
    layer_params = (count_parameters(cfg, include_embedding=False) - head) / cfg.num_layers
    return 6 * head / (6 * layer_params + attention_flops_per_token(cfg, seq_length) / cfg.num_layers)


def count_lora_parameters(cfg: ModelConfig, lora_cfg: LoraConfig) -> int:
    """Adapter parameters of the full model (what peft reports as trainable)."""
    return sum(math.prod(shape) for shape in expected_adapter_shapes(cfg, lora_cfg).values())


def lora_flops_per_token(cfg: ModelConfig, lora_cfg: LoraConfig, seq_length: int) -> float:
    """LoRA training FLOPs per token: the frozen base runs forward and the input-gradient half of backward (4·N,
    no weight gradients), the adapters all three (6·N_lora), attention scores as in `flops_per_token`.
    Recomputation under activation checkpointing is not counted (as in the issue's "LoRA MFU")."""
    n = count_parameters(cfg, include_embedding=False)
    return 4 * n + 6 * count_lora_parameters(cfg, lora_cfg) + attention_flops_per_token(cfg, seq_length)
