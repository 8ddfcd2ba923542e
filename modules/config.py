"""ModelConfig: the few numbers a pipeline stage needs, read from a Hugging Face `config.json`.

transformers does the parsing (so every spelling it accepts is accepted here); this file only flattens the families
into one dataclass and turns anything unsupported into a one-line `ModelError` naming the setting: a config field
the blocks do not implement is refused, never ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from utils.errors import UserError

SUPPORTED_MODEL_TYPES = ("gptneox", "gptj", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
# The families built from modules/decoder.py's pre-norm blocks (Hugging Face's Llama names).
DECODER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")

# transformers' `model_type` -> ours.
_HF_TO_OURS = {
    "gpt_neox": "gptneox",
    "gptj": "gptj",
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
_OURS_TO_HF = {v: k for k, v in _HF_TO_OURS.items()}
# Checkpoints of a family this project trains only part of: what to use instead.
_ONLY_PART = {
    "gemma3": "a Gemma 3 vision-language checkpoint; train its text model (model_type gemma3_text, e.g. "
    "google/gemma-3-1b-it, or the text weights of a larger one saved with Gemma3ForCausalLM)",
}

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
    pad_token_id: int | None  # decoder families: the embedding keeps this row at zero with no gradient, as HF does
    hf_config_dict: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json, for export
    # What the newer families add (modules/decoder.py); the defaults are Llama's.
    o_bias: bool | None = None  # the output projection's bias; None: attention_bias (Qwen2: q/k/v only)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)
    layer_types: tuple[str, ...] = ()  # "full" or "sliding" per layer; (): all full
    sliding_window: int | None = (
        None  # a sliding layer's token sees the last `sliding_window` positions, itself included
    )
    attn_softcap: float | None = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # the LM head's logits likewise (Gemma 2)
    attn_scale: float | None = None  # query scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the model dtype (Gemma)
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma)
    local_rope_theta: float | None = None  # sliding layers' rotary base when it differs (Gemma 3)
    local_rope_scaling: dict | None = None

    def layer_type(self, index: int) -> str:
        return self.layer_types[index] if self.layer_types else "full"

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
    if hf_type in _ONLY_PART:
        raise ModelError(f"{source}: model_type {hf_type!r} is {_ONLY_PART[hf_type]}")
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


def _rope(
    hf, source: str, default_partial: float = 1.0, params: dict | None = None
) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, scaling) from transformers 5 `rope_parameters` (or `params`, one layer
    type's) or 4.x attributes."""
    params = dict(params if params is not None else getattr(hf, "rope_parameters", None) or {})
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
        pad_token_id=getattr(hf, "pad_token_id", None) if model_type in DECODER_FAMILIES else None,
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
    return _decoder_config(model_type, hf, common, source)


# Config values of the decoder families that the blocks do not implement, refused in one line: (field, allowed).
_DROPOUT_FIELDS = ("attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout")


def _decoder_config(model_type: str, hf, common: dict, source: str) -> ModelConfig:
    """Llama and the families built from the same pre-norm blocks (modules/decoder.py), each as its differences."""
    for name in _DROPOUT_FIELDS:
        if getattr(hf, name, 0) not in (0, 0.0, None):
            raise ModelError(
                f"{source}: {name} is {getattr(hf, name)}; dropout inside the base model is not implemented "
                f"(set {name} to 0 in config.json; LoRA has --lora-dropout)"
            )
    if getattr(hf, "use_bidirectional_attention", None):
        raise ModelError(f"{source}: use_bidirectional_attention is set; only causal language models train here")
    hidden, heads = common["hidden_size"], common["num_heads"]
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    rope = getattr(hf, "rope_parameters", None) or {}
    local = None
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: one rotary per layer type
        theta, partial, scaling = _rope(hf, source, params=rope.get("full_attention", {}))
        local = _rope(hf, source, params=rope.get("sliding_attention", {}))
    else:
        theta, partial, scaling = _rope(hf, source)
    window = getattr(hf, "sliding_window", None)
    layer_types = _layer_types(model_type, hf, window, common["num_layers"], source)
    gemma = model_type in ("gemma2", "gemma3")
    act = getattr(hf, "hidden_activation", None) if gemma else None
    return ModelConfig(
        **common,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        norm_eps=float(hf.rms_norm_eps),
        hidden_act=_activation(act or hf.hidden_act, source),
        rotary_dim=int(head_dim * partial),
        rope_theta=theta,
        rope_scaling=scaling,
        use_parallel_residual=False,
        attention_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        o_bias=False if model_type == "qwen2" else None,
        qk_norm=model_type in ("qwen3", "gemma3"),
        layer_types=layer_types,
        sliding_window=int(window) if "sliding" in layer_types else None,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5 if gemma else None,
        embed_scale=gemma,
        norm_offset=gemma,
        sandwich_norms=gemma,
        local_rope_theta=local[0] if local is not None and local[0] != theta else None,
        local_rope_scaling=local[2] if local is not None else None,
    )


def _layer_types(model_type: str, hf, window: int | None, num_layers: int, source: str) -> tuple[str, ...]:
    """ "full" / "sliding" per layer: Mistral and Phi-3 slide on every layer when the config sets a window; Qwen and
    Gemma say per layer (`layer_types`)."""
    if model_type in ("mistral", "phi3"):
        return ("sliding",) * num_layers if window else ()
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    given = list(getattr(hf, "layer_types", None) or [])
    if not given:
        return ()
    unknown = sorted({t for t in given if t not in names})
    if unknown:
        raise ModelError(f"{source}: layer_types {unknown} are not supported; supported: {', '.join(names)}")
    types = tuple(names[t] for t in given[:num_layers])
    if "sliding" in types and not window:
        raise ModelError(f"{source}: layer_types has sliding_attention layers but sliding_window is not set")
    return types if "sliding" in types else ()
