"""Weights of a stage: random init, and loading only the stage's own tensors from a checkpoint directory.

Two directory formats are read, both resolved to Hugging Face names (the stage's state_dict keys):
  * Hugging Face: `model.safetensors[.index.json]`, else `pytorch_model.bin[.index.json]`;
  * OpenChatKit layer-sharded (`tools/prepare_pretrained.py`, OpenChatKit's `prepare.py`): `pytorch_embs.*`,
    `pytorch_{i}.*` (block-local names), `pytorch_lm_head.*`, as `.safetensors` or `.pt`.
Tensors are read one at a time and copied into the existing parameters, so loading a stage costs about its own
share of the checkpoint in memory. Anything missing, unexpected or mis-shaped is a `ModelError` naming the tensor
and the file; nothing is skipped silently except stale buffers that transformers ignores too (below).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
from torch import nn

from utils.host import cores_per_rank
from utils.progress import progress

from .config import ModelConfig, ModelError
from .layers import RMSNorm
from .lora import is_lora_name
from .seeding import stable_seed
from .stage import Stage, build_stage, embedding_name, family, tied_parameter_names

# Buffers that old checkpoints carry and no model needs: GPT-NeoX/GPT-J causal-mask buffers, rotary inv_freq.
_IGNORED = re.compile(r"(^|\.)(attention|attn)\.(bias|masked_bias)$|(^|\.)inv_freq$")

# Key spellings that differ between transformers versions: {family: {other spelling: our (state_dict) name}}.
# transformers 5 calls GPT-NeoX's head `lm_head` in the module, while hub checkpoints (and 5.x's save_pretrained)
# write `embed_out`.
_ALIASES = {"gptneox": {"lm_head.weight": "embed_out.weight"}}

HF_SAFETENSORS_INDEX, HF_SAFETENSORS = "model.safetensors.index.json", "model.safetensors"
HF_BIN_INDEX, HF_BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
LAYER_SHARDED_EMBS, LAYER_SHARDED_HEAD = "pytorch_embs", "pytorch_lm_head"


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor of the full model, in state_dict order (a tied head included)."""
    # Built on the meta device (no memory) without the embedding, whose init is slow on meta; added by hand.
    with torch.device("meta"):
        body = build_stage(cfg, 0, cfg.num_layers, False, True)
    shapes = {embedding_name(cfg): (cfg.vocab_size, cfg.hidden_size)}
    shapes.update((name, tuple(t.shape)) for name, t in body.state_dict().items())
    return shapes


def expected_names(cfg: ModelConfig) -> list[str]:
    return list(expected_shapes(cfg))


def canonical_name(cfg: ModelConfig, name: str) -> str:
    return _ALIASES.get(cfg.model_type, {}).get(name, name)


def layer_sharded_location(cfg: ModelConfig, name: str) -> tuple[str, str]:
    """HF name -> (file stem, key inside that file) in the layer-sharded format."""
    fam = family(cfg)
    layers = f"{fam.PREFIX}.{fam.LAYERS}."
    if name.startswith(layers):
        index, local = name[len(layers) :].split(".", 1)
        return f"pytorch_{index}", local
    if name.startswith(f"{fam.PREFIX}.{fam.EMBED}."):
        return LAYER_SHARDED_EMBS, name[len(fam.PREFIX) + 1 :]
    if name.startswith(f"{fam.PREFIX}.{fam.FINAL_NORM}."):
        return LAYER_SHARDED_HEAD, name[len(fam.PREFIX) + 1 :]
    return LAYER_SHARDED_HEAD, name  # the head lives outside the prefix


def _from_layer_sharded(cfg: ModelConfig, stem: str, local: str) -> str:
    fam = family(cfg)
    if stem == LAYER_SHARDED_EMBS:
        return f"{fam.PREFIX}.{local}"
    if stem == LAYER_SHARDED_HEAD:
        local = canonical_name(cfg, local)
        return local if local.startswith(f"{fam.HEAD}.") else f"{fam.PREFIX}.{local}"
    return f"{fam.PREFIX}.{fam.LAYERS}.{stem[len('pytorch_') :]}.{local}"


# ---------------------------------------------------------------------------------------------------------------
# Random init
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_stage_weights(stage: Stage, cfg: ModelConfig, seed: int, threads: int | None = None) -> None:
    """transformers' scheme: normal(0, initializer_range) for Linear/Embedding weights, zero biases, unit norms.

    Each tensor draws from its own CPU generator seeded by (seed, HF name), so the weights do not depend on the
    pipeline layout or the device. A tied head on a separate last stage draws the embedding's values. LoRA adapters
    are left alone: `lora.init_lora_weights` initialises them.

    One generator's normal draw runs on one core (~50 M values/s: half a minute for 1.4B parameters), so the
    tensors are drawn by `threads` host threads at once (default: this process's share of the cores), largest
    first; each thread copies its tensor into the parameter, on whatever device it lives. Same values as one
    thread: every tensor still has its own generator.
    """
    tied = tied_parameter_names(cfg)
    embed = embedding_name(cfg)
    std = cfg.initializer_range
    draws = []
    for name, param in stage.named_parameters():  # a shared (tied) Parameter is listed once, as the embedding
        if is_lora_name(name):
            continue
        module = stage.get_submodule(name.rsplit(".", 1)[0])
        leaf = name.rsplit(".", 1)[1]
        if isinstance(module, (nn.LayerNorm, RMSNorm)):  # Gemma's (1 + weight) norms start at zero, as in HF
            param.fill_(1.0 if leaf == "weight" and not getattr(module, "offset", False) else 0.0)
        elif leaf == "bias":
            param.zero_()
        else:
            draws.append((tied.get(name, name), param))  # a separate tied head draws exactly the embedding's values

    @torch.no_grad()  # grad mode is per thread: the pool's threads need their own
    def draw(source: str, param: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(stable_seed(seed, source))
        value = torch.empty(param.shape).normal_(0.0, std, generator=gen)
        if source == embed and cfg.pad_token_id is not None:  # llama: padding row starts at zero, as in HF
            value[cfg.pad_token_id] = 0
        param.copy_(value)

    draws.sort(key=lambda item: -item[1].numel())
    workers = min(threads or cores_per_rank(), len(draws))
    if workers <= 1:
        for source, param in draws:
            draw(source, param)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="init") as pool:
        for done in [pool.submit(draw, source, param) for source, param in draws]:
            done.result()  # an error in a thread is raised here


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoint directories
# ---------------------------------------------------------------------------------------------------------------


def _torch_load(path: str) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file: no mmap
    except Exception as e:  # unpickling errors come in many types; report one line naming the file
        raise ModelError(f"{path}: cannot read checkpoint file ({type(e).__name__}: {e})") from None


def _file_keys(path: str) -> list[str]:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        return list(_torch_load(path).keys())
    except Exception as e:
        raise ModelError(f"{path}: cannot read checkpoint file ({type(e).__name__}: {e})") from None


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot read the weight_map of this index file ({e})") from None


class Checkpoint:
    """Where each HF-named tensor of a checkpoint directory lives: {name: (file path, key in file)}.

    Files are listed lazily: a layer-sharded directory only opens the files a stage needs.
    """

    def __init__(self, model_dir: str, cfg: ModelConfig):
        self.model_dir, self.cfg = str(model_dir), cfg
        self.shapes = expected_shapes(cfg)
        self._expected = set(self.shapes)
        self._tied = tied_parameter_names(cfg)
        join = lambda name: os.path.join(self.model_dir, name)  # noqa: E731
        self.layer_sharded_suffix, self.source = None, self.model_dir
        if not os.path.isdir(self.model_dir):
            raise ModelError(f"{self.model_dir}: checkpoint directory not found")
        for name, indexed in (
            (HF_SAFETENSORS_INDEX, True),
            (HF_SAFETENSORS, False),
            (HF_BIN_INDEX, True),
            (HF_BIN, False),
        ):
            if os.path.isfile(join(name)):
                self.format, self.source = "hf", join(name)  # `source`: the file named in "missing" errors
                files = self._index_files(self.source) if indexed else {self.source: None}
                break
        else:
            stems = (LAYER_SHARDED_EMBS, LAYER_SHARDED_HEAD, "pytorch_0")
            for suffix in (".safetensors", ".pt"):
                if any(os.path.isfile(join(stem + suffix)) for stem in stems):
                    self.format, self.layer_sharded_suffix = "layer_sharded", suffix
                    break
            else:
                raise ModelError(
                    f"{self.model_dir}: no weights found; expected {HF_SAFETENSORS}[.index.json], "
                    f"{HF_BIN}[.index.json] or layer-sharded pytorch_embs/pytorch_<i>/pytorch_lm_head "
                    f".safetensors or .pt files"
                )
            files = {}
        self._locations: dict[str, tuple[str, str]] = {}
        self._listed: set[str] = set()
        if self.format == "hf":
            for path, keys in files.items():
                self._add_file(path, keys, lambda key: key)

    def _index_files(self, index_path: str) -> dict[str, list[str]]:
        files: dict[str, list[str]] = defaultdict(list)
        for key, filename in _read_index(index_path).items():
            files[os.path.join(self.model_dir, filename)].append(key)
        for path in files:
            if not os.path.isfile(path):
                raise ModelError(f"{path}: file listed in {index_path} not found")
        return files

    def _add_file(self, path: str, keys, to_hf) -> None:
        """Record where each tensor of `path` lives; unknown names are an error (stale buffers excepted)."""
        self._listed.add(path)
        for key in _file_keys(path) if keys is None else keys:
            if _IGNORED.search(key):
                continue
            name = canonical_name(self.cfg, to_hf(key))
            if name not in self._expected:
                raise ModelError(
                    f"{path}: unexpected tensor {key!r} (not part of a {self.cfg.model_type} model with "
                    f"{self.cfg.num_layers} layers)"
                )
            if name in self._locations:
                raise ModelError(f"{path}: tensor {key!r} also found in {self._locations[name][0]}")
            self._locations[name] = (path, key)

    def _layer_sharded_file(self, stem: str) -> str:
        path = os.path.join(self.model_dir, stem + self.layer_sharded_suffix)
        if path not in self._listed:
            if not os.path.isfile(path):
                raise ModelError(f"{path}: file not found (layer-sharded checkpoint)")
            self._add_file(path, None, lambda key: _from_layer_sharded(self.cfg, stem, key))
        return path

    def locate(self, name: str) -> tuple[str, str]:
        """(file path, key in file) of HF tensor `name`; a tied head resolves to the embedding."""
        name = self._tied.get(name, name)
        where = self.source
        if self.format == "layer_sharded":
            where = self._layer_sharded_file(layer_sharded_location(self.cfg, name)[0])
        if name not in self._locations:
            raise ModelError(f"{where}: tensor {name!r} is missing from the checkpoint")
        return self._locations[name]

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint (lists all files of a layer-sharded directory)."""
        if self.format == "layer_sharded":
            for name in sorted(self._expected):
                try:
                    self.locate(name)
                except ModelError:
                    pass
        return list(self._locations)


def read_tensors(locations: dict[str, tuple[str, str]], device: torch.device | str = "cpu"):
    """Yield (name, tensor) for {name: (path, key)}, one tensor in memory at a time, grouped by file.

    Safetensors files are read straight onto `device` (safetensors copies the mapped bytes there: no host copy
    of its own, and a cast to the stage's dtype then runs on the device); `.bin`/`.pt` tensors stay on the host."""
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, (path, key) in locations.items():
        by_file[path].append((name, key))
    for path, items in by_file.items():
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            for name, key in items:
                # A fresh handle per tensor: its mapped pages are released as soon as the tensor is copied.
                with safe_open(path, framework="pt", device=str(device)) as f:
                    tensor = f.get_tensor(key)
                yield name, tensor
                del tensor
        else:
            state = _torch_load(path)  # memory-mapped: only the tensors we touch are read
            for name, key in items:
                yield name, state[key]
            del state


@torch.no_grad()
def load_stage_weights(stage: Stage, model_dir: str, is_logger: bool = False) -> None:
    """Copy this stage's tensors from `model_dir` (HF or layer-sharded) into its parameters, in place. LoRA
    adapters are not part of a base checkpoint and are skipped (`lora.load_lora_tensors` fills them).

    `is_logger`: this process draws the progress bar (utils.progress; the logging rank only)."""
    cfg = stage.cfg
    ckpt = Checkpoint(model_dir, cfg)
    targets: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in stage.state_dict(keep_vars=True).items():
        if id(tensor) in seen or is_lora_name(name):  # a tied head sharing the embedding is loaded once
            continue
        seen.add(id(tensor))
        targets[name] = tensor
    locations = {name: ckpt.locate(name) for name in targets}
    device = next(iter(targets.values())).device if targets else torch.device("cpu")
    loading = progress(read_tensors(locations, device), "loading weights", len(locations), "tensor", is_logger)
    for name, tensor in loading:
        target = targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            path, key = locations[name]
            raise ModelError(
                f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(target.shape)} for {name}"
            )
        target.copy_(tensor)
