"""Hugging Face model directory -> OpenChatKit layer-sharded directory (safetensors).

    python tools/prepare_pretrained.py --model-name /path/to/hf_model --output pretrained/my_model

Writes `pytorch_embs.safetensors`, `pytorch_<i>.safetensors` (one per layer, block-local key names) and
`pytorch_lm_head.safetensors`, plus config.json and the tokenizer files. One layer is in memory at a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from modules.config import ModelError, load_model_config  # noqa: E402
from modules.export import copy_tokenizer_files  # noqa: E402
from modules.weights import Checkpoint, layer_sharded_location, read_tensors  # noqa: E402


def prepare(model_dir: str, output_dir: str) -> list[str]:
    """Write the layer-sharded copy of `model_dir` into `output_dir`; returns the files written."""
    from safetensors.torch import save_file

    # Writing into the source would mix the shards into the model directory before config.json's copy fails.
    if os.path.realpath(output_dir) == os.path.realpath(model_dir):
        raise ModelError(
            f"--output {output_dir} is the model directory {model_dir} itself; give --output a new "
            f"directory for the layer-sharded copy"
        )
    cfg = load_model_config(model_dir)
    ckpt = Checkpoint(model_dir, cfg)
    if ckpt.format != "hf":
        raise ModelError(f"{model_dir}: already a layer-sharded directory; expected a Hugging Face model directory")
    by_file: dict[str, dict[str, str]] = defaultdict(dict)  # stem -> {hf name: local key}
    for name in ckpt.names():
        stem, local = layer_sharded_location(cfg, name)
        by_file[stem][name] = local

    os.makedirs(output_dir, exist_ok=True)
    written = []
    for stem, names in by_file.items():
        locations = {name: ckpt.locate(name) for name in names}
        # clone(): .bin checkpoints may share storage between tensors, which safetensors refuses to write.
        data = {}
        for name, tensor in read_tensors(locations):
            if tuple(tensor.shape) != ckpt.shapes[name]:
                path, key = locations[name]
                raise ModelError(
                    f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(ckpt.shapes[name])}"
                )
            data[names[name]] = tensor.contiguous().clone()
        path = os.path.join(output_dir, f"{stem}.safetensors")
        save_file(data, path, metadata={"format": "pt"})
        written.append(path)
        del data
    shutil.copy2(os.path.join(model_dir, "config.json"), os.path.join(output_dir, "config.json"))
    copy_tokenizer_files(model_dir, output_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-name", required=True, help="local Hugging Face model directory (config.json + weights)"
    )
    parser.add_argument("--output", required=True, help="directory to write the layer-sharded copy into")
    args = parser.parse_args(argv)
    try:
        written = prepare(args.model_name, args.output)
    except (ModelError, OSError) as e:
        print(f"prepare_pretrained: error: {e}", file=sys.stderr)
        return 2
    print(f"prepare_pretrained: wrote {len(written)} weight files to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
