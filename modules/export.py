"""Write a Hugging Face model directory from HF-named tensors (a merge of a checkpoint's stage files).

The output is what `AutoModelForCausalLM.from_pretrained` expects: `model.safetensors` (or shards plus an index),
`config.json` with the dtype written, and tokenizer files when a tokenizer directory is given; plus what running the
model elsewhere needs: `special_tokens_map.json`, `generation_config.json` with the EOS id training appended to every
document, and (write_model_card) a README.md naming the base model, the data and the flags.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch

import config
from utils.progress import progress

from .config import ModelConfig, ModelError
from .stage import tied_parameter_names
from .weights import canonical_name, expected_names

HF_WEIGHT_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES:
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")


def hf_tensor_names(tensors: Mapping[str, object], cfg: ModelConfig, source: str = "checkpoint") -> dict[str, str]:
    """{name to write: key in `tensors`} in HF order; raises ModelError on missing or unexpected tensors.

    GPT-NeoX's head is written as `embed_out.weight` (what hub checkpoints and transformers 5's save_pretrained
    use, and what transformers 4 and 5 both load); a tied head is dropped, as save_pretrained does.
    """
    tied = tied_parameter_names(cfg)
    by_name: dict[str, str] = {}
    for key in tensors:
        name = canonical_name(cfg, key)
        if name in by_name:
            raise ModelError(f"{source}: tensor {key!r} given twice (also as {by_name[name]!r})")
        by_name[name] = key
    expected = expected_names(cfg)
    unexpected = sorted(set(by_name) - set(expected))
    if unexpected:
        raise ModelError(
            f"{source}: unexpected tensor {unexpected[0]!r} for a {cfg.model_type} model "
            f"with {cfg.num_layers} layers ({len(unexpected)} unexpected in all)"
        )
    wanted = [name for name in expected if name not in tied]
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise ModelError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    return {name: by_name[name] for name in wanted}


def save_hf_directory(
    tensors: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    output_dir: str,
    dtype: str | torch.dtype = "fp32",
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    source: str = "checkpoint",
) -> None:
    """Write `tensors` (HF names; a lazy Mapping is fine: each tensor is fetched once) as a HF model directory."""
    from safetensors.torch import save_file

    dtype = parse_dtype(dtype)
    names = hf_tensor_names(tensors, cfg, source)
    # Weights of an earlier export would be mixed with these (transformers prefers model.safetensors over an
    # index): refuse rather than overwrite a model the user may still need.
    old_weights = sorted(
        f
        for f in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
        if any(fnmatch.fnmatch(f, pattern) for pattern in HF_WEIGHT_FILES)
    )
    if old_weights:
        raise ModelError(
            f"{output_dir} already holds model weights ({', '.join(old_weights[:3])}); export into a "
            f"new folder, or delete them first"
        )
    os.makedirs(output_dir, exist_ok=True)

    # Group into shards by size, in HF order, so one shard at a time is in memory.
    shards: list[list[str]] = [[]]
    size = 0
    element = torch.tensor([], dtype=dtype).element_size()
    shapes = {name: _numel(tensors, key) for name, key in names.items()}
    for name in names:
        nbytes = shapes[name] * element
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    weight_map = {}
    # One pass over the tensors in HF order (the shards' order), with a bar: a 20B export takes minutes.
    stream = ((name, tensors[names[name]]) for name in progress(list(names), "export", unit="tensor"))
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {name: t.detach().to("cpu", dtype).contiguous() for name, t in itertools.islice(stream, len(shard))}
        save_file(data, os.path.join(output_dir, filename), metadata={"format": "pt"})
        del data
        weight_map.update({name: filename for name in shard})
    if len(shards) > 1:
        total = sum(shapes.values()) * element
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    config = dict(cfg.hf_config_dict)
    config["dtype"] = _DTYPE_NAMES[dtype]
    if "torch_dtype" in config:  # transformers 4 spelling: keep it consistent when the source had it
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, output_dir, everything=True)
    write_generation_files(output_dir, cfg)


def _numel(tensors: Mapping, key: str) -> int:
    shape = getattr(tensors, "shape_of", None)  # lazy mappings can answer without reading the tensor
    if shape is not None:
        n = 1
        for d in shape(key):
            n *= d
        return n
    return tensors[key].numel()


# Tokenizer and generation files of a HF model directory (weights and config.json are handled separately).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src_dir: str, output_dir: str, everything: bool = False) -> list[str]:
    """Copy tokenizer files from `src_dir`; `everything` copies every regular file (a dedicated tokenizer/ dir)."""
    copied = []
    for entry in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, entry)
        if not os.path.isfile(path) or entry == "config.json":  # never overwrite the model's config
            continue
        if everything or entry in TOKENIZER_FILES or entry.endswith(".tiktoken"):
            shutil.copy2(path, os.path.join(output_dir, entry))
            copied.append(entry)
    return copied


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def write_generation_files(output_dir: str, cfg: ModelConfig) -> None:
    """special_tokens_map.json (transformers 5 no longer writes it; 4.x loaders and other tools read it) and
    generation_config.json whose eos_token_id is the tokenizer's EOS: `generate` then stops where training ended
    every document. Files the tokenizer directory brought are kept, an EOS id is added when they lack one."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = None
    if any(os.path.isfile(os.path.join(output_dir, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
    ids = {key: cfg.hf_config_dict.get(f"{key}_token_id") for key in ("bos", "eos", "pad")}
    if tokenizer is not None:
        for key in ids:
            if getattr(tokenizer, f"{key}_token_id", None) is not None:
                ids[key] = getattr(tokenizer, f"{key}_token_id")
        special_map = os.path.join(output_dir, "special_tokens_map.json")
        if not os.path.isfile(special_map):
            tokens = {k: str(getattr(tokenizer, k)) for k in _SPECIAL_TOKENS if getattr(tokenizer, k, None)}
            with open(special_map, "w") as f:
                json.dump(tokens, f, indent=2)
    if os.path.isfile(os.path.join(output_dir, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(output_dir)
    else:
        generation = GenerationConfig()
    for key, value in ids.items():
        if value is not None and getattr(generation, f"{key}_token_id", None) is None:
            setattr(generation, f"{key}_token_id", value)
    generation.save_pretrained(output_dir)


# Settings a model card lists (when set), in this order: what a reader needs to judge or repeat the run.
_CARD_SETTINGS = [
    ("model", "model_type"),
    ("data", "seq_length"),
    ("data", "batch_size"),
    ("data", "micro_batch_size"),
    ("data", "accumulation"),
    ("dist", "pipeline_size"),
    ("dist", "data_size"),
    ("data", "total_iterations"),
    ("data", "epochs"),
    ("optimizer", "lr"),
    ("optimizer", "lr_scheduler"),
    ("optimizer", "warmup_iterations"),
    ("optimizer", "kind"),
    ("optimizer", "weight_decay"),
    ("optimizer", "max_grad_norm"),
    ("model", "fp16"),
    ("model", "bf16"),
    ("lora", "r"),
    ("data", "train_on_inputs"),
    ("data", "loss_on_bot_only"),
    ("model", "seed"),
]


def write_model_card(output_dir: str, meta: dict[str, Any], step: int, source: str) -> None:
    """README.md of an export: base model, data sources, the training settings, and how to load and chat with it."""
    job = config.saved_job(meta)
    data = [part for part in str(job.data.task_spec or "").split(",") if part]
    evaluation = [part for part in str(job.data.evaluation_data or "").split(",") if part]
    base = f"`{job.model.model_dir or 'unknown'}` ({meta.get('model_type', 'unknown')})"
    origin = f"Fine-tuned from {base}" if job.model.load_pretrained else f"Trained from scratch as {base}"
    lines = [
        f"# {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"{origin}, exported from `{source}` (optimizer step {step}).",
        "",
        "## Data",
        "",
        *([f"- `{part}`" for part in data] or ["- not recorded in the checkpoint"]),
        *(["", "Evaluation data:", "", *[f"- `{part}`" for part in evaluation]] if evaluation else []),
        "",
        "## Training flags",
        "",
        "| flag | value |",
        "| --- | --- |",
        *[
            f"| `{flag}` | `{value}` |"
            for flag, value in config.flag_values(job, _CARD_SETTINGS)
            if value not in (None, False) and not (flag == "--lora-r" and value == 0)
        ],
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "Chat with it from the training repository: `python tools/chat.py PATH`. Without a chat template the prompt "
        "format is OpenChatKit's: `<human>: question` then `<bot>:` on a new line.",
        "",
    ]
    versions = meta.get("versions")
    if versions:
        lines += ["Trained with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".", ""]
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))
