"""Training checkpoint -> Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint-path ckpt/ [--step N] --output hf_model/ [--dtype bf16]

Reads `<ckpt>/latest` (or --step), then `<ckpt>/checkpoint_<step>/meta.json` and the stage files
`prank_<p>_model.safetensors` for p < layout.pp. Stage files hold Hugging Face-named tensors, so the pipeline layout
used in training needs no flags here: the stages are merged by name. Besides weights and config.json the folder gets
the tokenizer files, special_tokens_map.json, generation_config.json (EOS id) and a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from checkpoint.names import LATEST, META, TOKENIZER_DIR, stage_model_file, step_dir_name  # noqa: E402
from checkpoint.store import CheckpointError, file_problem, read_latest  # noqa: E402
from checkpoint.training_state import base_fingerprint  # noqa: E402
from modules.config import ModelError, model_config_from_dict  # noqa: E402
from modules.export import DTYPES, copy_tokenizer_files, save_hf_directory, write_model_card  # noqa: E402
from modules.lora import LoraConfig, merge_lora_tensors, save_peft_adapter  # noqa: E402
from modules.stage import tied_parameter_names  # noqa: E402
from modules.weights import Checkpoint, expected_names, read_tensors  # noqa: E402

_HF_MODEL_TYPES = {"gpt_neox": "gptneox"}


class StageFiles(Mapping):
    """The tensors of several safetensors files as one read-on-demand mapping {name: tensor}."""

    def __init__(self, paths: list[str]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        for path in paths:
            try:
                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors' own error types
                raise ModelError(f"{path}: cannot read safetensors file ({e})") from None
            for key in keys:
                if key in self._where:
                    raise ModelError(f"{path}: tensor {key!r} is also in {self._where[key]}")
                self._where[key] = path

    def __getitem__(self, key):
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as f:
            return f.get_tensor(key)

    def shape_of(self, key) -> list[int]:
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as f:
            return f.get_slice(key).get_shape()

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def resolve_step(checkpoint_path: str, step: int | None) -> int:
    if not os.path.isdir(checkpoint_path):
        raise ModelError(f"{checkpoint_path}: checkpoint directory not found")
    if step is not None:
        return step
    try:
        latest = read_latest(checkpoint_path)
    except CheckpointError as e:
        raise ModelError(f"{e}; or pass --step N to pick a checkpoint") from None
    if latest is None:
        raise ModelError(f"{os.path.join(checkpoint_path, LATEST)}: file not found; pass --step N to pick a checkpoint")
    return latest


def convert(
    checkpoint_path: str,
    output_dir: str,
    step: int | None = None,
    dtype: str = "fp32",
    merge_lora: bool = False,
    base_model: str | None = None,
) -> str:
    """Write the HF directory for one checkpoint step; returns the checkpoint folder used. A LoRA checkpoint
    becomes a peft adapter directory, or with `merge_lora` a full model with the adapters merged into the base
    (read from `base_model`, default the base the metadata names)."""
    step = resolve_step(checkpoint_path, step)
    folder = os.path.join(checkpoint_path, step_dir_name(step))
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: checkpoint for step {step} not found")
    meta_path = os.path.join(folder, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        model_type, model_config, pp = meta["model_type"], meta["model_config"], int(meta["layout"]["pp"])
        if not isinstance(meta["files"], dict):  # {file: sha256}, checked below
            raise TypeError("'files' is not an object")
    except OSError:
        raise ModelError(f"{meta_path}: file not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{meta_path}: expected JSON with model_type, model_config, layout.pp and files ({e!r})"
        ) from None
    cfg = model_config_from_dict(model_config, _HF_MODEL_TYPES.get(model_type, model_type), source=meta_path)
    names = [stage_model_file(p) for p in range(pp)]
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelError(f"{os.path.join(folder, name)}: stage weights not found (meta.json says pp={pp})")
        problem = file_problem(folder, meta, name)
        if problem:
            raise ModelError(f"{problem}; export another step (--step) or restore the file")
    paths = [os.path.join(folder, name) for name in names]
    tokenizer_dir = os.path.join(folder, TOKENIZER_DIR)
    tensors = StageFiles(paths)
    lora = meta.get("lora")
    if merge_lora and lora is None:
        raise ModelError(f"--merge-lora: {folder} is a full fine-tuning checkpoint (no adapters); drop --merge-lora")
    if lora is not None:
        try:
            lora_cfg = LoraConfig(
                int(lora["r"]), float(lora["alpha"]), float(lora["dropout"]), tuple(lora["target_modules"])
            )
            trained_on, fingerprint = lora["base_path"], lora["base_fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"{meta_path}: its lora section lacks r, alpha, dropout, targets or base ({e!r})"
            ) from None
        base = base_model or trained_on
        if not merge_lora:
            adapter_files = [
                f
                for f in ("adapter_config.json", "adapter_model.safetensors")
                if os.path.exists(os.path.join(output_dir, f))
            ]
            if adapter_files:
                raise ModelError(
                    f"{output_dir} already holds an adapter ({', '.join(adapter_files)}); export into a new folder, "
                    f"or delete them first"
                )
            save_peft_adapter(output_dir, {k: tensors[k] for k in tensors}, lora_cfg, cfg, base)
            if os.path.isdir(tokenizer_dir):
                copy_tokenizer_files(tokenizer_dir, output_dir)
            write_model_card(output_dir, meta, step, folder)
            return folder
        if fingerprint.startswith("seed "):
            raise ModelError(
                f"--merge-lora: the adapters of {folder} were trained on a random base ({fingerprint}, "
                f"--load-pretrained-model false), which no folder holds; export the adapter without --merge-lora"
            )
        if not os.path.isdir(base):
            raise ModelError(f"--merge-lora: the base model {base} is not there; pass --base-model DIR")
        if base_fingerprint(base) != fingerprint:
            raise ModelError(
                f"--merge-lora: the weights in {base} differ from the base the adapters were trained on "
                f"({trained_on}); pass that base with --base-model DIR"
            )
        tensors = merge_lora_tensors(BaseTensors(base, cfg), tensors, lora_cfg)
    save_hf_directory(
        tensors,
        cfg,
        output_dir,
        dtype=dtype,
        tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
        source=folder,
    )
    write_model_card(output_dir, meta, step, folder)
    return folder


class BaseTensors(Mapping):
    """The tensors of a base model directory (HF or layer-sharded) as a read-on-demand mapping {HF name: tensor}."""

    def __init__(self, model_dir: str, cfg):
        self.checkpoint = Checkpoint(model_dir, cfg)
        self.names = [n for n in expected_names(cfg) if n not in tied_parameter_names(cfg)]

    def __getitem__(self, key):
        tensor = next(read_tensors({key: self.checkpoint.locate(key)}))[1]
        if tuple(tensor.shape) != self.checkpoint.shapes[key]:
            raise ModelError(
                f"{self.checkpoint.model_dir}: {key} has shape {list(tensor.shape)}, the adapters' model needs "
                f"{list(self.checkpoint.shapes[key])}; pass the base they were trained on"
            )
        return tensor

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-path", required=True, help="training checkpoint directory (holds `latest`)")
    parser.add_argument("--step", type=int, default=None, help="step to convert (default: the one in `latest`)")
    parser.add_argument("--output", required=True, help="Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA checkpoint: write the full model with B·A·alpha/r merged into the base (default: a peft adapter)",
    )
    parser.add_argument("--base-model", default=None, help="--merge-lora: the base model (default: as trained)")
    args = parser.parse_args(argv)
    try:
        folder = convert(args.checkpoint_path, args.output, args.step, args.dtype, args.merge_lora, args.base_model)
    except (ModelError, OSError) as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_to_hf: wrote {args.output} from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
