"""ModelConfig: the few numbers a pipeline stage needs, read from a Hugging Face `config.json`.

transformers does the parsing (so every spelling it accepts is accepted here); this file only flattens the three
families into one dataclass and turns anything unsupported into a one-line `ModelError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from utils.errors import UserError

SUPPORTED_MODEL_TYPES = ("gptneox", "gptj", "llama")

# transformers' `model_type` -> ours.
_HF_TO_OURS = {"gpt_neox": "gptneox", "gptj": "gptj", "llama": "llama"}
_OURS_TO_HF = {v: k for k, v in _HF_TO_OURS.items()}

# Activations the blocks implement with plain torch (HF name -> our name).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

_ROPE_TYPES = ("default", "linear", "llama3")


class ModelError(UserError, ValueError):
    """A model directory, config or checkpoint that cannot be used; the message is one line naming the file."""


@dataclass
class ModelConfig:
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    norm_eps: float
    hidden_act: str  # gelu | gelu_tanh | relu | silu
    rotary_dim: int  # leading dims of each head that get rotary (partial rotary when < head_dim)
    rope_theta: float
    rope_scaling: dict | None  # None, {"rope_type": "linear", "factor"} or llama3's dict
    use_parallel_residual: bool  # gptneox only (gptj is always parallel, llama never)
    tie_word_embeddings: bool
    initializer_range: float
    attention_bias: bool  # gptneox: qkv/dense biases; llama: q/k/v/o biases
    mlp_bias: bool  # llama only
    max_position_embeddings: int
    pad_token_id: int | None  # llama's embedding keeps this row at zero with no gradient, as transformers does
    hf_config_dict: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json, for export

    @property
    def hf_model_type(self) -> str:
        return _OURS_TO_HF[self.model_type]


def load_model_config(model_dir: str, model_type: str | None = None) -> ModelConfig:
    """Read `model_dir/config.json` (local files only). `model_type`, when given, must agree with the file."""
    path = os.path.join(str(model_dir), "config.json")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: file not found; expected a Hugging Face model directory with config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read JSON ({e})") from None
    ours = _check_type(raw, model_type, path)
    import transformers  # imported here: it is slow and only needed to parse configs

    try:
        hf = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types; we report one line
        raise ModelError(f"{path}: transformers cannot parse this config ({e})") from None
    return _from_hf(ours, hf, raw, path)


def model_config_from_dict(raw: dict, model_type: str | None = None, source: str = "config.json") -> ModelConfig:
    """Same as `load_model_config` for an in-memory config.json dict (e.g. from a checkpoint's meta.json)."""
    ours = _check_type(raw, model_type, source)
    import transformers

    try:
        hf = transformers.AutoConfig.for_model(**raw)
    except Exception as e:
        raise ModelError(f"{source}: transformers cannot parse this config ({e})") from None
    return _from_hf(ours, hf, dict(raw), source)


def _check_type(raw: dict, model_type: str | None, source: str) -> str:
    """Our family name for this config.json; raises when unsupported or when it contradicts `model_type`."""
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    hf_type = raw.get("model_type")
    ours = _HF_TO_OURS.get(hf_type)
    if ours is None:
        raise ModelError(f"{source}: model_type {hf_type!r} is not supported; supported model types: {supported}")
    if model_type is not None:
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"model type {model_type!r} is not supported (supported model types: {supported})")
        if model_type != ours:
            raise ModelError(
                f"{source}: model_type is {hf_type!r} ({ours}) but {model_type!r} was requested; "
                f"supported model types: {supported}"
            )
    return ours


def _rope(hf, source: str, default_partial: float = 1.0) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, scaling) from transformers 5 `rope_parameters` or 4.x attributes."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf, "rope_scaling", None)
    if not params and legacy_scaling:
        params = dict(legacy_scaling)
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or getattr(hf, "rotary_emb_base", None))
    partial = params.get("partial_rotary_factor", getattr(hf, "rotary_pct", None) or default_partial)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelError(
            f"{source}: rope type {rope_type!r} is not supported; supported rope types: {', '.join(_ROPE_TYPES)}"
        )
    scaling = None
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(params["factor"])}
    elif rope_type == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(params["original_max_position_embeddings"]),
        }
    return float(theta if theta is not None else 10000.0), float(partial), scaling


def _activation(name: str, source: str) -> str:
    if name not in _ACTIVATIONS:
        raise ModelError(f"{source}: activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _from_hf(model_type: str, hf, raw: dict, source: str) -> ModelConfig:
    hidden, heads = hf.hidden_size, hf.num_attention_heads
    common = dict(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        vocab_size=hf.vocab_size,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        initializer_range=float(getattr(hf, "initializer_range", 0.02) or 0.02),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        pad_token_id=getattr(hf, "pad_token_id", None) if model_type == "llama" else None,
        hf_config_dict=raw,
    )
    if model_type == "gptneox":
        head_dim = hidden // heads
        theta, partial, scaling = _rope(hf, source, default_partial=0.25)
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            norm_eps=float(hf.layer_norm_eps),
            hidden_act=_activation(hf.hidden_act, source),
            rotary_dim=int(head_dim * partial),
            rope_theta=theta,
            rope_scaling=scaling,
            use_parallel_residual=bool(hf.use_parallel_residual),
            attention_bias=bool(getattr(hf, "attention_bias", True)),
            mlp_bias=True,
        )
    if model_type == "gptj":
        head_dim = hidden // heads
        # GPT-J's rotary is fixed at base 10000 (transformers ignores any rope setting for it).
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=hf.n_inner if hf.n_inner is not None else 4 * hidden,
            norm_eps=float(hf.layer_norm_epsilon),
            hidden_act=_activation(hf.activation_function, source),
            rotary_dim=int(hf.rotary_dim or head_dim),
            rope_theta=10000.0,
            rope_scaling=None,
            use_parallel_residual=True,
            attention_bias=False,
            mlp_bias=True,
        )
    # llama
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    theta, partial, scaling = _rope(hf, source)
    return ModelConfig(
        **common,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        norm_eps=float(hf.rms_norm_eps),
        hidden_act=_activation(hf.hidden_act, source),
        rotary_dim=int(head_dim * partial),
        rope_theta=theta,
        rope_scaling=scaling,
        use_parallel_residual=False,
        attention_bias=bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
    )
