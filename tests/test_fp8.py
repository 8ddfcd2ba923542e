"""modules/fp8.py: which linears --fp8 converts, that checkpoints keep their names and dtypes, that a float8 stage
trains close to the plain one, and the GPU check.

The float8 matmul needs a GPU of compute capability 8.9+; torchao's emulation mode runs the same casts with plain
matmuls, so the numerics of a converted stage are checked on CPU. The flag refusals (no GPU, no bf16, LoRA, no
torchao) are in tests/test_flags.py and do not need torchao.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import transformers
from torch import nn

# torchao is not in requirements-dev.txt (its CUDA wheels are noisy beside CPU torch); .ci/run puts it on PYTHONPATH.
pytest.importorskip("torchao")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import modules  # noqa: E402
from config import ModelRunConfig  # noqa: E402
from modules import ModelError  # noqa: E402
from pipeline_parallel import StagePlan  # noqa: E402

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# hidden 64 and intermediate 1088: only the MLP's up projections ([1088, 64]) pass tensorwise's size filter
# (out > 1024); the vocabulary of 1088 would pass it too, and the embedding and head must stay as they are.
CONFIGS = {
    "gptneox": lambda: transformers.GPTNeoXConfig(
        vocab_size=1088,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1088,
        rope_parameters={**ROPE, "partial_rotary_factor": 0.25},
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=1088,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=1088,
        rope_parameters=ROPE,
        tie_word_embeddings=False,
    ),
}
CONVERTED = {
    "gptneox": ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_h_to_4h"],
    "llama": [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate_proj", "up_proj")],
}


def make_stage(family, dtype=torch.float32, activation_checkpointing="none"):
    cfg = modules.model_config_from_dict(CONFIGS[family]().to_dict())
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True, activation_checkpointing)
    modules.init_stage_weights(stage, cfg, seed=3)
    return stage.to(dtype)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_conversion_takes_the_large_block_linears_and_keeps_names_and_dtypes(family):
    stage = make_stage(family, torch.bfloat16)
    before = {k: (v.dtype, v.shape) for k, v in stage.state_dict().items()}
    plain = {k: v.clone() for k, v in stage.state_dict().items()}

    converted = modules.convert_blocks_to_float8(stage, "tensorwise")

    assert converted == CONVERTED[family]
    assert {k: (v.dtype, v.shape) for k, v in stage.state_dict().items()} == before
    assert all(torch.equal(v, plain[k]) for k, v in stage.state_dict().items())
    # A bf16 run's checkpoint loads into the float8 stage and back, strictly (the names are the HF names).
    stage.load_state_dict(plain, strict=True)
    reloaded = make_stage(family, torch.bfloat16)
    reloaded.load_state_dict(stage.state_dict(), strict=True)
    linears = {"gptneox": 8, "llama": 14}[family]
    summary = modules.float8_summary([stage], "tensorwise")
    assert summary.startswith(f"fp8 tensorwise: {len(converted)} of {linears} block linears in float8"), summary


def test_build_rank_stages_converts_every_stage_of_the_rank():
    cfg = modules.model_config_from_dict(CONFIGS["gptneox"]().to_dict())
    run = ModelRunConfig(model_dir="", load_pretrained=False, bf16=True, compile=True, fp8="tensorwise")
    stages = modules.build_rank_stages(cfg, run, StagePlan(2, [(0, 1), (1, 2)], [0, 1]), torch.device("cpu"))
    converted = [n for stage in stages for n, m in stage.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted == CONVERTED["gptneox"]


def test_filter_agrees_with_torchao_auto_filter():
    """Our size thresholds are torchao 0.18's auto filter (torchtitan's); compare on a grid of shapes."""
    from torchao.float8 import _auto_filter_for_recipe

    sizes = [16, 24, 512, 1024, 1040, 2048, 2064, 4096, 4112, 8192]
    for recipe in modules.fp8.RECIPES:
        theirs = _auto_filter_for_recipe(recipe, filter_fqns=[])
        for out_features in sizes:
            for in_features in sizes:
                with torch.device("meta"):
                    linear = nn.Linear(in_features, out_features)
                expected = theirs(linear, "layers.0.mlp")
                assert modules.gains_from_float8(out_features, in_features, recipe) == expected, (
                    recipe,
                    out_features,
                    in_features,
                )
    # Pythia-6.9B's four block linears all gain under both recipes; Pythia-410M keeps its [1024, *] ones in bf16.
    for out_features, in_features in ((12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)):
        assert modules.gains_from_float8(out_features, in_features, "rowwise")
    assert not modules.gains_from_float8(1024, 4096, "tensorwise")


def loss_and_grads(stage, tokens):
    logits = stage(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
    stage.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_stage_trains_close_to_the_plain_stage(recipe, monkeypatch):
    """Emulated float8 (fp32, CPU): the loss and every gradient stay close to the plain stage's and are not equal
    to them (the casts are really there); full recomputation gives the very same numbers."""
    # Convert every linear (the tiny shapes would not pass the size filter), the embedding and head still not.
    monkeypatch.setattr(modules.fp8, "gains_from_float8", lambda out_features, in_features, recipe: True)
    torch.manual_seed(0)
    tokens = torch.randint(0, 1088, (2, 33))
    plain = make_stage("llama")
    fp8 = copy.deepcopy(plain)
    names = modules.convert_blocks_to_float8(fp8, recipe, emulate=True)
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down)

    loss, grads = loss_and_grads(plain, tokens)
    fp8_loss, fp8_grads = loss_and_grads(fp8, tokens)
    assert fp8_loss != loss
    assert abs(fp8_loss - loss) / loss < 1e-3, (fp8_loss, loss)  # measured: 4e-5 tensorwise, 1.3e-4 rowwise
    assert fp8_grads.keys() == grads.keys()
    for name, grad in grads.items():
        cosine = nn.functional.cosine_similarity(fp8_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)

    recomputed = make_stage("llama", activation_checkpointing="full")
    recomputed.load_state_dict(plain.state_dict())
    modules.convert_blocks_to_float8(recomputed, recipe, emulate=True)
    again_loss, again_grads = loss_and_grads(recomputed, tokens)
    assert torch.equal(again_loss, fp8_loss)
    assert all(torch.equal(again_grads[n], g) for n, g in fp8_grads.items())


def test_device_check_names_the_gpu_and_its_capability(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ModelError) as info:
        modules.check_fp8_device(cuda)
    message = str(info.value)
    assert "--fp8 needs an NVIDIA GPU with compute capability 8.9+" in message
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message and "\n" not in message

    for capability in ((8, 9), (9, 0), (10, 0)):  # L4 / RTX 4090, H100 / H200, B200
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        modules.check_fp8_device(cuda)
    with pytest.raises(ModelError, match="no CUDA device"):
        modules.check_fp8_device(torch.device("cpu"))
