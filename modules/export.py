"""Write a Hugging Face model directory from HF-named tensors (a merge of a checkpoint's stage files).

The output is what `AutoModelForCausalLM.from_pretrained` expects: `model.safetensors` (or shards plus an index),
`config.json` with the dtype written, and tokenizer files when a tokenizer directory is given.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Mapping

import torch

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
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {name: tensors[names[name]].detach().to("cpu", dtype).contiguous() for name in shard}
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
