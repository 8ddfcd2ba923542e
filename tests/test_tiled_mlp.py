"""--tiled-mlp: each block's MLP a tile of tokens at a time gives the untiled loss and gradients in every family
kind of block (GPT-NeoX's parallel residual, GPT-J's, the Llama-style decoder with Gemma's sandwich norms, Phi-3's
fused projection), with and without activation checkpointing around it, and the same outputs without gradients;
the run's flag tiles every block of the stages it builds."""

import pytest
import torch

import config
import modules
from modules.tiled_mlp import TILE_TOKENS, tile_mlps
from pipeline_parallel import plan_stages
from tests.helpers import make_model

FAMILIES = ["gptneox", "gptj", "llama", "gemma2", "phi3"]


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiled_mlp_trains_like_the_whole_one(family, checkpointing, tmp_path):
    path = make_model(tmp_path / family, model_type=family, hidden=32, layers=2, heads=4)
    cfg = modules.load_model_config(path)
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True, checkpointing)
    modules.load_stage_weights(stage, path)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)

    def loss_and_grads():
        stage.zero_grad()
        loss = torch.nn.functional.cross_entropy(stage(ids).flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in stage.named_parameters()}

    want, want_grads = loss_and_grads()
    with torch.no_grad():
        want_eval = stage(ids)
    tile_mlps(stage.blocks, tokens=7)  # 40 tokens: five full tiles and a short one
    got, got_grads = loss_and_grads()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)
    seen = []  # the tokens of each call of the first block's MLP
    stage.blocks[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        torch.testing.assert_close(stage(ids), want_eval, rtol=1e-6, atol=1e-6)
    assert seen == [7, 7, 7, 7, 7, 5]


def test_the_flag_tiles_every_block_of_the_stages_a_rank_builds(tmp_path):
    path = make_model(tmp_path / "m", model_type="llama", hidden=32, layers=4, heads=4)
    cfg = modules.load_model_config(path)
    plan = plan_stages(cfg.num_layers, 2, 1, "gpipe", 1, None, 0.0)
    for flag, tile in (("off", 0), ("on", TILE_TOKENS)):
        job = config.parse(["--model-name", path, "--task-name", path, "--tiled-mlp", flag])
        (stage,) = modules.build_rank_stages(cfg, job.model, plan, torch.device("cpu"))
        assert [getattr(b.mlp, "tile_tokens", 0) for b in stage.blocks] == [tile, tile]
