"""The start-up memory plan: exact bytes of weights, gradients and optimizer state per rank for each precision,
optimizer, sharding, offload and adapter setting; activations that follow checkpointing, offload and the schedule;
the loss path that chunking bounds; a refusal in one line (naming the flags that fit) where the static part alone
exceeds the GPU."""

import pytest
import torch

import config
import modules
from comm import Layout
from modules.tiled_mlp import TILE_TOKENS
from pipeline_parallel import plan_stages
from tests.helpers import make_model
from training.chunked_logps import CHUNK_ELEMENTS
from training.memory_plan import GB, MemoryPlanError, check_memory_plan, plan_memory


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("m") / "m", model_type="llama", hidden=64, layers=4, heads=4)
    return path, modules.load_model_config(path)


def job_of(path, *flags):
    return config.parse(["--model-name", path, "--task-name", path, "--micro-batch-size", "2", *flags])


def whole_model(cfg):
    return plan_stages(cfg.num_layers, 1, 0, "gpipe", 1, None, 0.0)


def count(cfg):
    with torch.device("meta"):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    return sum(p.numel() for p in stage.parameters())


def test_static_memory_is_exact_for_each_precision_optimizer_and_sharding(model):
    path, cfg = model
    n = count(cfg)
    fp32 = plan_memory(job_of(path), cfg, whole_model(cfg), 1, 1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # no master copy in fp32
    bf16 = plan_memory(job_of(path, "--bf16"), cfg, whole_model(cfg), 1, 1)
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * n, 2 * n, 12 * n)  # fp32 master + Adam's two
    sharded = plan_memory(job_of(path, "--bf16", "--dp-mode", "sharded"), cfg, whole_model(cfg), 1, 4)
    assert sharded.optimizer == 12 * n / 4
    offloaded = plan_memory(job_of(path, "--bf16", "--offload-optimizer", "cpu"), cfg, whole_model(cfg), 1, 1)
    assert offloaded.optimizer == 0 and offloaded.weights == 2 * n


def test_adapters_train_only_their_own_elements_and_a_quantised_base_is_smaller(model):
    path, cfg = model
    job = job_of(path, "--bf16", "--lora-r", "4")
    lora = modules.make_lora_config(cfg, 4, 8, 0.0, job.lora.target_modules)
    with torch.device("meta"):
        stage = modules.apply_lora(modules.build_stage(cfg, 0, cfg.num_layers, True, True), lora, seed=None)
    adapters = sum(p.numel() for n, p in stage.named_parameters() if "lora_" in n)
    plan = plan_memory(job, cfg, whole_model(cfg), 1, 1, lora)
    assert plan.gradients == 2 * adapters and plan.optimizer == 12 * adapters
    nf4 = plan_memory(
        job_of(path, "--bf16", "--lora-r", "4", "--quantize-base", "nf4"), cfg, whole_model(cfg), 1, 1, lora
    )
    assert nf4.weights < plan.weights and nf4.gradients == plan.gradients


def test_activations_follow_checkpointing_offload_and_the_schedule(model):
    path, cfg = model
    flags = ("--bf16", "--seq-length", "128", "--batch-size", "8")
    plain = plan_memory(job_of(path, *flags), cfg, whole_model(cfg), 1, 1)
    full = plan_memory(job_of(path, *flags, "--activation-checkpointing", "full"), cfg, whole_model(cfg), 1, 1)
    moved = plan_memory(
        job_of(path, *flags, "--activation-checkpointing", "full", "--activation-offload", "cpu"),
        cfg,
        whole_model(cfg),
        1,
        1,
    )
    tokens = 2 * 128
    assert full.activations == cfg.num_layers * tokens * 2 * cfg.hidden_size  # each block's bf16 input
    assert plain.activations > 5 * full.activations and moved.activations == 0
    first_of_two = plan_stages(cfg.num_layers, 2, 0, "gpipe", 1, None, 0.0)
    gpipe = plan_memory(job_of(path, *flags, "--pipeline-group-size", "2"), cfg, first_of_two, 2, 1)
    one_f_one_b = plan_memory(
        job_of(path, *flags, "--pipeline-group-size", "2", "--pp-mode", "1f1b"), cfg, first_of_two, 2, 1
    )
    assert (gpipe.in_flight, one_f_one_b.in_flight) == (4, 2)  # 8 / 2 micro-batches; 1F1B: stages from here on


def test_a_tiled_mlp_holds_one_tile_of_intermediates(model):
    """--tiled-mlp: the recomputed block's MLP intermediates shrink to one tile; without checkpointing no block holds
    them; the warning of a run over its GPU names the flag where a micro-batch is longer than a tile."""
    path, cfg = model
    flags = ("--bf16", "--seq-length", "16384", "--batch-size", "2", "--micro-batch-size", "1")
    full = ("--activation-checkpointing", "full")
    untiled = plan_memory(job_of(path, *flags, *full), cfg, whole_model(cfg), 1, 1)
    tiled = plan_memory(job_of(path, *flags, *full, "--tiled-mlp", "on"), cfg, whole_model(cfg), 1, 1)
    assert untiled.working - tiled.working == 2 * 4 * cfg.intermediate_size * (16384 - TILE_TOKENS)
    plain = plan_memory(job_of(path, *flags), cfg, whole_model(cfg), 1, 1)
    plain_tiled = plan_memory(job_of(path, *flags, "--tiled-mlp", "on"), cfg, whole_model(cfg), 1, 1)
    assert plain.activations - plain_tiled.activations == cfg.num_layers * 16384 * 2 * 4 * cfg.intermediate_size
    lay = Layout(0, 1, 1, 1, 0, 0, 0, torch.device("cpu"))
    logged = []
    job = job_of(path, *flags, *full)
    check_memory_plan(job, cfg, whole_model(cfg), lay, None, logged.append, capacity=int(untiled.static) + 1)
    assert "--tiled-mlp on" in logged[-1]


def test_the_loss_path_is_bounded_once_chunked(model):
    path, cfg = model
    flags = ("--seq-length", "128", "--batch-size", "8")
    plain = plan_memory(job_of(path, *flags, "--chunked-loss", "off"), cfg, whole_model(cfg), 1, 1)
    chunked = plan_memory(job_of(path, *flags, "--chunked-loss", "on"), cfg, whole_model(cfg), 1, 1)
    assert plain.working == 10 * 2 * 128 * cfg.vocab_size and chunked.working == 10 * CHUNK_ELEMENTS
    assert chunked.chunked and not plain.chunked


def test_a_rank_whose_static_memory_cannot_fit_is_refused_naming_the_fixes(model):
    path, cfg = model
    lay = Layout(0, 1, 1, 1, 0, 0, 0, torch.device("cpu"))
    logged = []
    job = job_of(path, "--bf16")
    estimate = plan_memory(job, cfg, whole_model(cfg), 1, 1)
    roomy = int(estimate.total) + GB
    check_memory_plan(job, cfg, whole_model(cfg), lay, None, logged.append, capacity=roomy)
    assert logged == [estimate.line(roomy)] and "memory plan (GB on this rank): weights" in logged[0]
    with pytest.raises(MemoryPlanError) as refused:
        check_memory_plan(job, cfg, whole_model(cfg), lay, None, logged.append, capacity=int(estimate.static) - 1)
    message = str(refused.value)
    assert "\n" not in message and "alone need" in message
    for fix in ("--offload-optimizer cpu", "--optimizer 8bit-adam", "--lora-r", "--pipeline-group-size"):
        assert fix in message
    # the whole estimate over the GPU only warns, naming what lowers activations
    logged.clear()
    check_memory_plan(job, cfg, whole_model(cfg), lay, None, logged.append, capacity=int(estimate.static) + 1)
    assert logged[-1].startswith("WARNING: the memory plan") and "--activation-checkpointing full" in logged[-1]
    # a CPU run without a capacity logs nothing
    logged.clear()
    check_memory_plan(job, cfg, whole_model(cfg), lay, None, logged.append)
    assert logged == []
