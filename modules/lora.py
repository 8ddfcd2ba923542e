"""LoRA adapters on a pipeline stage, and peft's adapter file format.

    lora_cfg = make_lora_config(cfg, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    apply_lora(stage, lora_cfg, seed=0)          # base frozen, adapters trainable
    adapters = lora_state_dict(stage)            # {"<hf module>.lora_A.weight": [r, in], ".lora_B.weight": [out, r]}
    save_peft_adapter(out_dir, adapters, lora_cfg, cfg, base_model_path)   # what peft.PeftModel loads
    merged = merge_lora_tensors(base_tensors, adapters, lora_cfg)          # W + alpha/r * B @ A

A `LoraLinear` keeps the replaced linear's `weight` and `bias` under their own names, so the stage's base
state_dict keys stay the Hugging Face names, and adds `lora_A.weight` and `lora_B.weight` next to them: our adapter
names are peft's file keys without the `base_model.model.` prefix. The maths and the initialisation are peft's
(`peft/tuners/lora/layer.py`): y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r, A kaiming-uniform(a=sqrt(5)),
B zero. Only peft's plain LoRA is supported (no rslora, DoRA, bias training, modules_to_save, per-layer ranks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, ModelError
from .seeding import stable_seed
from .stage import Stage, family

ALL_LINEAR = "all-linear"
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PEFT_WEIGHTS_BIN = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)

# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING in peft/utils/constants.py).
DEFAULT_TARGET_MODULES = {
    "gptneox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),  # peft has no default for Phi-3: its fused attention projection
}


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # leaf names of block linears, e.g. ("q_proj", "v_proj"); () = peft's default

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ModelError(f"LoRA rank r={self.r!r} is invalid; expected an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"LoRA dropout {self.dropout!r} is invalid; expected a value in [0, 1)")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ModelError(f"LoRA alpha {self.alpha!r} is invalid; expected a positive number")

    @property
    def scale(self) -> float:
        """alpha / r: peft's default scaling (not rslora's alpha / sqrt(r))."""
        return self.alpha / self.r


# ---------------------------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------------------------


def block_linears(cfg: ModelConfig) -> dict[str, str]:
    """{leaf name: path inside a block} of every linear layer of the family's block, in module order.

    Read from a block built on the meta device, so it can never drift from the model code. The LM head is outside
    the blocks: like peft's `all-linear`, LoRA never targets it.
    """
    with torch.device("meta"):
        block = family(cfg).Block(cfg)
    return {path.rsplit(".", 1)[-1]: path for path, m in block.named_modules() if isinstance(m, nn.Linear)}


def resolve_target_modules(cfg: ModelConfig, target_modules: str | Sequence[str] | None) -> tuple[str, ...]:
    """Leaf names to adapt, in block order. None or empty: peft's default for the family; "all-linear": every
    linear of the blocks; otherwise names (a list or one comma-separated string), each a leaf name or a dotted
    path ending a module path in the block ("mlp.dense_4h_to_h")."""
    linears = block_linears(cfg)
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    names = list(target_modules or DEFAULT_TARGET_MODULES[cfg.model_type])
    if ALL_LINEAR in names:
        return tuple(linears)
    chosen = set()
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in linears or not ("." + linears[leaf]).endswith("." + name):
            raise ModelError(
                f"LoRA target module {name!r} is not a linear layer of a {cfg.model_type} block; valid names: "
                f"{', '.join(linears)} (or {ALL_LINEAR})"
            )
        chosen.add(leaf)
    return tuple(leaf for leaf in linears if leaf in chosen)


def make_lora_config(
    cfg: ModelConfig,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] | None = None,
) -> LoraConfig:
    """A validated LoraConfig for this model: ModelError (one line) on a bad rank, dropout, alpha or name."""
    lora_cfg = LoraConfig(r, float(alpha), float(dropout))  # validates r, alpha, dropout first
    return LoraConfig(lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, resolve_target_modules(cfg, target_modules))


# ---------------------------------------------------------------------------------------------------------------
# The LoRA linear
# ---------------------------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A linear layer with a frozen base (`weight`, `bias`) and a trainable low-rank update (`lora_A`, `lora_B`)."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The same Parameter objects: nothing is copied, and loading the base afterwards fills these tensors.
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        # Adapters start in the base's floating dtype; `.to()` / materialize_stage may change both together.
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # As peft: no dropout module at p=0, so the adapter path has no random op to trace or to checkpoint.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scale = r, scale
        self.base_layer: nn.Module | None = None  # a bitsandbytes layer once `quantize_base` replaced weight/bias
        self.enabled = True  # off: the base alone (DPO's reference model, `adapters_off`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if not self.enabled:
            return out
        # Same op order as peft (result + lora_B(lora_A(dropout(x))) * scaling), so fp32 results agree closely;
        # adapters may be kept in another dtype than the base (fp32 adapters on a bf16 base).
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scale
        return out + update.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale}"


def _targets(stage: Stage, target_modules: Sequence[str]) -> Iterator[tuple[nn.Module, str]]:
    """(parent module, attribute name) of each targeted linear in the stage's blocks."""
    linears = block_linears(stage.cfg)
    for block in stage.blocks:
        for leaf in target_modules:
            parent_path, _, attr = linears[leaf].rpartition(".")
            yield (block.get_submodule(parent_path) if parent_path else block), attr


def apply_lora(stage: Stage, lora_cfg: LoraConfig, seed: int | None = 0) -> Stage:
    """Replace the targeted linears of `stage`'s blocks by LoraLinear, freeze every base parameter (embedding,
    norms and head included) and leave only the adapters trainable; in place, returns the stage.

    Adapters are initialised from `seed` as peft does, unless the stage is on the meta device (or seed is None):
    then call `init_lora_weights` after `materialize_stage`.
    """
    targets = resolve_target_modules(stage.cfg, lora_cfg.target_modules)
    if any(isinstance(m, LoraLinear) for m in stage.modules()):
        raise ModelError("apply_lora: this stage already has LoRA adapters")
    for param in stage.parameters():
        param.requires_grad_(False)
    for parent, attr in _targets(stage, targets):
        base = getattr(parent, attr)
        setattr(parent, attr, LoraLinear(base, lora_cfg.r, lora_cfg.scale, lora_cfg.dropout))
    stage.lora_config = lora_cfg
    if seed is not None and not any(p.is_meta for p in lora_parameters(stage).values()):
        init_lora_weights(stage, seed)
    return stage


@contextlib.contextmanager
def adapters_off(stages: Sequence[nn.Module]) -> Iterator[None]:
    """The stages compute their frozen base alone while inside: the reference model of preference tuning, without
    a second copy of the weights."""
    layers = [m for stage in stages for m in stage.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def is_lora_name(name: str) -> bool:
    return name.endswith("." + LORA_A) or name.endswith("." + LORA_B)


def lora_parameters(stage: nn.Module) -> dict[str, nn.Parameter]:
    """{adapter name: Parameter} of the stage, in module order (the parameters to train)."""
    return {name: p for name, p in stage.named_parameters() if is_lora_name(name)}


def lora_state_dict(stage: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (detached, sharing storage with the stage), under our (HF-based) names."""
    return {name: p.detach() for name, p in lora_parameters(stage).items()}


@torch.no_grad()
def init_lora_weights(stage: nn.Module, seed: int) -> None:
    """peft's init: A kaiming-uniform(a=sqrt(5)) (nn.Linear's default), B zero, so the adapted model starts equal
    to the base. A is drawn on the CPU from a generator seeded by (seed, name): the same for any layout or device."""
    for name, param in lora_parameters(stage).items():
        if name.endswith(LORA_B):
            param.zero_()
            continue
        value = torch.empty(param.shape, dtype=torch.float32)
        gen = torch.Generator().manual_seed(stable_seed(seed, name))
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
        param.copy_(value)


@torch.no_grad()
def load_lora_tensors(stage: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy this stage's adapters from `tensors` ({our name: tensor}, other stages' tensors ignored)."""
    for name, param in lora_parameters(stage).items():
        if name not in tensors:
            raise ModelError(f"{source}: LoRA tensor {name!r} is missing")
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelError(
                f"{source}: LoRA tensor {name!r} has shape {list(tensor.shape)}, expected {list(param.shape)}"
            )
        param.copy_(tensor)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA: the frozen base in bitsandbytes 4-bit NF4 or 8-bit
# ---------------------------------------------------------------------------------------------------------------

QUANTIZE_MODES = ("none", "nf4", "int8")


BITSANDBYTES_MISSING = "quantising the base needs bitsandbytes: pip install bitsandbytes"


def check_quantize_available(mode: str) -> None:
    """Before the model load: the library `--quantize-base` needs is installed (without importing it: seconds)."""
    import importlib.util

    if mode != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantize-base {mode}: {BITSANDBYTES_MISSING}")


def import_bitsandbytes():
    """bitsandbytes, imported only when a base is quantised (it takes seconds to import); one line when missing."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ModelError(
            f"quantising the base needs bitsandbytes, which cannot be imported ({e}); run: pip install bitsandbytes"
        ) from None
    return bitsandbytes


def _quantized_linear(bnb, linear_weight: nn.Parameter, bias, mode: str, compute_dtype: torch.dtype, device):
    """A bitsandbytes layer holding `linear_weight` quantised (NF4 with double quantisation, or int8), on `device`.

    Built on the meta device first so that no full-precision copy is allocated; bitsandbytes quantises when the
    layer is moved to a device."""
    out_features, in_features = linear_weight.shape
    data = linear_weight.detach().to(torch.float16 if mode == "int8" else compute_dtype)
    with torch.device("meta"):
        if mode == "nf4":
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False)
    # bitsandbytes quantises a parameter when it moves from the CPU to a device (int8 only from the CPU), so the
    # full-precision weight goes through the host once; loading stage by stage keeps that to one tensor at a time.
    if mode == "nf4":
        layer.weight = bnb.nn.Params4bit(data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    else:
        layer.weight = bnb.nn.Int8Params(data.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    return layer.to(device)


@torch.no_grad()
def quantize_base(
    stage: Stage, mode: str, compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> Stage:
    """QLoRA: hold every linear of the stage's blocks (adapted or not; never the embedding or head) in bitsandbytes
    NF4 with double quantisation (`nf4`) or 8-bit (`int8`), computing in `compute_dtype`; in place.

    Call after the base weights are loaded: a quantised weight cannot be loaded into. An adapted linear's base moves
    into its `base_layer` (peft's name); other linears keep their names. The adapters are untouched and stay
    trainable. bitsandbytes quantises on `device` (default: where the weights are).
    """
    if mode not in QUANTIZE_MODES:
        raise ModelError(f"quantize mode {mode!r} is not supported; expected one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return stage
    if not any(isinstance(m, LoraLinear) for m in stage.modules()):
        raise ModelError("quantising the base needs LoRA adapters on the stage (apply_lora first)")
    bnb = import_bitsandbytes()
    for block in stage.blocks:
        for path, module in list(block.named_modules()):
            if isinstance(module, LoraLinear) and module.base_layer is None:
                target = device if device is not None else module.weight.device
                module.base_layer = _quantized_linear(bnb, module.weight, module.bias, mode, compute_dtype, target)
                del module.weight, module.bias
            elif type(module) is nn.Linear and "lora_" not in path:
                target = device if device is not None else module.weight.device
                parent_path, _, attr = path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                setattr(parent, attr, _quantized_linear(bnb, module.weight, module.bias, mode, compute_dtype, target))
    return stage


# ---------------------------------------------------------------------------------------------------------------
# Merging into the base
# ---------------------------------------------------------------------------------------------------------------


class MergedTensors(Mapping):
    """`base_tensors` with W + scale * B @ A for every adapted weight, merged on access (one tensor at a time in
    memory, so a 20B export stays bounded); other tensors pass through. Merged weights stay fp32: the exporter
    casts to the dtype asked for (a bf16 round trip here would lose small updates)."""

    def __init__(self, base_tensors: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scale: float):
        self.base, self.adapters, self.scale = base_tensors, adapters, scale
        modules_ = sorted({name[: -len(LORA_A) - 1] for name in adapters if name.endswith(LORA_A)})
        if len(adapters) != 2 * len(modules_):
            raise ModelError("LoRA tensors: every module needs both lora_A.weight and lora_B.weight")
        self.merged = {}
        for module in modules_:
            weight = f"{module}.weight"
            if weight not in base_tensors or f"{module}.{LORA_B}" not in adapters:
                raise ModelError(f"LoRA tensors: {module!r} has no base weight or no lora_B.weight to merge with")
            self.merged[weight] = module

    def __getitem__(self, key: str) -> torch.Tensor:
        weight = self.base[key]
        module = self.merged.get(key)
        if module is None:
            return weight
        a = self.adapters[f"{module}.{LORA_A}"].float()
        b = self.adapters[f"{module}.{LORA_B}"].float()
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or b.shape[1] != a.shape[0]:
            raise ModelError(
                f"LoRA tensors: {module!r} has A {list(a.shape)} and B {list(b.shape)}, which do not fit the base "
                f"weight {list(weight.shape)}"
            )
        return weight.float() + self.scale * (b @ a).to(weight.device)

    def shape_of(self, key: str):
        shape_of = getattr(self.base, "shape_of", None)
        return shape_of(key) if shape_of is not None else list(self.base[key].shape)

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def merge_lora_tensors(
    base_tensors: Mapping[str, torch.Tensor], adapter_tensors: Mapping[str, torch.Tensor], lora_cfg: LoraConfig
) -> Mapping[str, torch.Tensor]:
    """Base tensors (HF names) with the adapters merged in: W + alpha/r * B @ A, in fp32."""
    return MergedTensors(base_tensors, adapter_tensors, lora_cfg.scale)


# ---------------------------------------------------------------------------------------------------------------
# peft's adapter directory
# ---------------------------------------------------------------------------------------------------------------


def save_peft_adapter(
    directory: str,
    adapter_tensors: Mapping[str, torch.Tensor],
    lora_cfg: LoraConfig,
    cfg: ModelConfig,
    base_model_path: str | None,
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` as peft's `save_pretrained` does, so that
    `peft.PeftModel.from_pretrained(base, directory)` loads every adapter with no missing or unexpected key."""
    from safetensors.torch import save_file

    expected = expected_adapter_shapes(cfg, lora_cfg)
    _check_adapter_tensors(adapter_tensors, expected, "LoRA tensors")
    os.makedirs(directory, exist_ok=True)
    data = {PEFT_PREFIX + name: adapter_tensors[name].detach().to("cpu").contiguous() for name in expected}
    save_file(data, os.path.join(directory, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": list(resolve_target_modules(cfg, lora_cfg.target_modules)),  # () = the default
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with open(os.path.join(directory, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# adapter_config.json settings we cannot train or load, with the value that plain LoRA has.
_PLAIN_LORA = {
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
}


def load_peft_adapter(
    directory: str, cfg: ModelConfig, expect: LoraConfig | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a peft LoRA adapter directory: (its LoraConfig, {our adapter name: tensor}) for every layer.

    Settings we do not support (rslora, DoRA, bias training, modules_to_save, per-layer ranks, ...), target names
    that are not linears of this family's blocks, adapters missing from some layers, and (with `expect`) a rank,
    alpha or target list other than the run's, each raise a one-line ModelError.
    """
    config_path = os.path.join(str(directory), PEFT_CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ModelError(f"{config_path}: file not found; expected a peft adapter directory")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_path}: cannot read JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise ModelError(f"{config_path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key, plain in _PLAIN_LORA.items():
        value = raw.get(key, plain)
        if value != plain and not (plain is None and value in ([], {})):
            raise ModelError(f"{config_path}: {key}={value!r} is not supported (only plain LoRA: {key}={plain!r})")
    try:
        lora_cfg = LoraConfig(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)))
    except KeyError as e:
        raise ModelError(f"{config_path}: {e.args[0]!r} is missing") from None
    except ModelError as e:
        raise ModelError(f"{config_path}: {e}") from None
    targets = _targets_of_peft_config(raw.get("target_modules"), cfg, config_path)
    lora_cfg = LoraConfig(lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, targets)
    if expect is not None:
        for field in ("r", "alpha", "target_modules"):
            if getattr(lora_cfg, field) != getattr(expect, field):
                raise ModelError(
                    f"{config_path}: adapter has {field}={_show(getattr(lora_cfg, field))} but this run has "
                    f"{field}={_show(getattr(expect, field))}; pass the adapter's settings or train a new one"
                )

    tensors = _read_adapter_tensors(str(directory))
    ours = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ModelError(f"{directory}: unexpected adapter tensor {key!r} (peft keys start with {PEFT_PREFIX!r})")
        ours[key[len(PEFT_PREFIX) :]] = tensor
    _check_adapter_tensors(ours, expected_adapter_shapes(cfg, lora_cfg), str(directory))
    return lora_cfg, ours


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else repr(value)


def _targets_of_peft_config(target_modules, cfg: ModelConfig, source: str) -> tuple[str, ...]:
    """Our leaf names from peft's `target_modules`: a list of leaf names or full module paths (peft writes full
    paths for `all-linear`), "all-linear", or a regular expression matched against full module paths."""
    fam = family(cfg)
    linears = block_linears(cfg)
    full = {
        f"{fam.PREFIX}.{fam.LAYERS}.{i}.{path}": leaf for i in range(cfg.num_layers) for leaf, path in linears.items()
    }
    if target_modules is None:
        raise ModelError(f"{source}: target_modules is missing")
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        matched = [leaf for path, leaf in full.items() if re.fullmatch(target_modules, path)]
        if not matched:
            raise ModelError(
                f"{source}: target_modules {target_modules!r} matches no linear layer of a {cfg.model_type} block; "
                f"valid names: {', '.join(linears)}"
            )
        target_modules = matched
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [full.get(name, name) for name in names]  # full module paths -> leaf names
    try:
        return resolve_target_modules(cfg, names)
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None


def _read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    st, bin_ = os.path.join(directory, PEFT_WEIGHTS_FILE), os.path.join(directory, PEFT_WEIGHTS_BIN)
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            return load_file(st)
        if os.path.isfile(bin_):
            return torch.load(bin_, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and unpickling raise many types; report one line naming the file
        raise ModelError(f"{st if os.path.isfile(st) else bin_}: cannot read adapter weights ({e})") from None
    raise ModelError(f"{directory}: no {PEFT_WEIGHTS_FILE} (or {PEFT_WEIGHTS_BIN}) found")


def expected_adapter_shapes(cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """{our adapter name: shape} of every adapter of the whole model, in layer and block order."""
    fam = family(cfg)
    linears = block_linears(cfg)
    with torch.device("meta"):
        block = fam.Block(cfg)
    shapes = {}
    for i in range(cfg.num_layers):
        for leaf in resolve_target_modules(cfg, lora_cfg.target_modules):
            module = block.get_submodule(linears[leaf])
            name = f"{fam.PREFIX}.{fam.LAYERS}.{i}.{linears[leaf]}"
            shapes[f"{name}.{LORA_A}"] = (lora_cfg.r, module.in_features)
            shapes[f"{name}.{LORA_B}"] = (module.out_features, lora_cfg.r)
    return shapes


def _check_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: dict, source: str) -> None:
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ModelError(
            f"{source}: LoRA tensor {missing[0]!r} is missing ({len(missing)} missing in all; adapters must cover "
            f"the same modules in every layer)"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelError(f"{source}: unexpected LoRA tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelError(
                f"{source}: LoRA tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )
