"""The shipped 20B recipe script itself, on CPU: its environment overrides train a tiny model end to end, and one
rank failing before the job is up stops the others at once."""

import os
import re
import stat
import subprocess
import time

import pytest

from tests.helpers import REPO, free_port, held_port, make_chat_data, make_model, read_checkpoint_weights

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint

RECIPE = os.path.join(REPO, "finetune_GPT-NeoXT-Chat-Base-20B.sh")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, every data file the recipe names, and a stand-in nvidia-smi listing two GPUs. The model, data
    and checkpoint paths have spaces in them, which the script must pass on whole."""
    root = tmp_path_factory.mktemp("recipe") / "my runs"
    root.mkdir()
    model = make_model(root / "base model", hidden=32, layers=4, heads=4)
    data = root / "chat data"
    data.mkdir()
    with open(RECIPE) as f:
        names = set(re.findall(r"\$\{DATASETS\}/(unified_\w+\.jsonl)", f.read()))
    assert len(names) == 26
    for i, name in enumerate(sorted(names)):
        make_chat_data(data / name, n=20, seed=i)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return root, model, str(data), str(bin_dir)


def recipe_env(setup, ckpt, port):
    root, model, data, bin_dir = setup
    # EXTRA_ARGS come last on the command line, so they override the recipe's 20B sizes for the tiny model.
    extra = "--use-cuda false --embedding-dim 32 --num-layers 2 --seq-length 32 --batch-size 2 --dist-timeout 60"
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        NUM_GPUS="2",
        MASTER_PORT=str(port),
        BASE_MODEL=model,
        DATASETS=data,
        CHECKPOINT_PATH=str(ckpt),
        FINETUNE_TOTAL_STEPS="2",
        CHECKPOINT_STEPS="2",
        EXTRA_ARGS=extra,
    )


def test_recipe_trains_with_its_environment_overrides(setup):
    ckpt = setup[0] / "run 1 ckpt"
    assert " " in str(ckpt) and " " in setup[1] and " " in setup[2]
    result = subprocess.run(
        ["bash", RECIPE], env=recipe_env(setup, ckpt, free_port()), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 stages over pp=2 x dp=1" in result.stdout + result.stderr
    weights = read_checkpoint_weights(str(ckpt))
    assert any(".layers.0." in k for k in weights) and any(".layers.3." in k for k in weights)


def test_recipe_stops_every_rank_when_one_fails_at_start(setup):
    """Rank 0 cannot listen on the port (something holds it); rank 1 would wait for it until --dist-timeout. The
    script must stop rank 1 as soon as rank 0 exits, and exit with rank 0's code."""
    with held_port() as port:
        start = time.monotonic()
        result = subprocess.run(
            ["bash", RECIPE],
            env=recipe_env(setup, setup[0] / "ckpt-fail", port),
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "in use" in result.stderr
    assert took < 45, f"the recipe took {took:.0f} s to stop after a rank failed"


def test_recipe_exits_with_the_ranks_code_on_a_bad_flag(setup):
    """A user error exits 2 from every rank; the script passes that on (not the status of killing ranks that had
    already exited)."""
    env = recipe_env(setup, setup[0] / "ckpt-bad", free_port())
    env.update(NUM_GPUS="1", EXTRA_ARGS=env["EXTRA_ARGS"] + " --micro-batch-size 3")  # does not divide batch 2
    result = subprocess.run(["bash", RECIPE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--micro-batch-size" in result.stderr


def run_lora_recipe(recipe, model, data, ckpt, extra=""):
    """A one-GPU LoRA recipe with its environment overrides: the tiny model, a pipeline of two on CPU, 2 steps."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        NUM_GPUS="2",
        MASTER_PORT=str(free_port()),
        BASE_MODEL=model,
        DATASETS=data,
        CHECKPOINT_PATH=str(ckpt),
        FINETUNE_TOTAL_STEPS="2",
        CHECKPOINT_STEPS="2",
        COMPILE="0",  # torch.compile on two CPU cores takes minutes
        EXTRA_ARGS=f"--use-cuda false --seq-length 32 --batch-size 2 --dist-timeout 60 {extra}".strip(),
    )
    command = ["bash", os.path.join(REPO, recipe)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_lora_recipe_trains_adapters_with_its_environment_overrides(setup, tmp_path):
    """The one-GPU LoRA recipe (a pipeline of two here, on CPU): it trains adapters only, and exports to peft."""
    root, model, data, _ = setup
    ckpt = tmp_path / "lora run"
    result = run_lora_recipe("finetune_GPT-NeoXT-Chat-Base-20B-lora.sh", model, data, ckpt)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = read_checkpoint_weights(str(ckpt))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any("query_key_value.lora_B" in k for k in weights)
    out = tmp_path / "adapter"
    export = subprocess.run(
        [
            "python3",
            os.path.join(REPO, "tools", "convert_to_hf.py"),
            "--checkpoint-path",
            str(ckpt),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_qwen3_lora_recipe_trains_every_linear_of_a_qwen3(setup, tmp_path):
    """finetune_Qwen3-8B-lora.sh on a tiny Qwen3 (a pipeline of two on CPU): all-linear adapters, the base frozen."""
    root, _, data, _ = setup
    model = make_model(
        root / "qwen3", model_type="qwen3", hidden=32, layers=2, heads=4, extra=("--tie-word-embeddings",)
    )
    ckpt = tmp_path / "qwen3 run"
    result = run_lora_recipe("finetune_Qwen3-8B-lora.sh", model, data, ckpt, "--micro-batch-size 1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = read_checkpoint_weights(str(ckpt))
    adapted = {k.split(".")[-3] for k in weights if ".lora_B." in k}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, adapted


def test_dpo_recipe_tunes_adapters_on_preference_pairs(setup, tmp_path):
    """finetune_Qwen3-8B-dpo.sh on a tiny Qwen3 and the bundled pairs (a pipeline of two on CPU): adapters train
    against the base with them off, and the log carries TRL's statistics."""
    root, _, _, _ = setup
    model = make_model(root / "qwen3-dpo", model_type="qwen3", hidden=32, layers=2, heads=4)
    pairs = os.path.join(REPO, "assets", "data", "sample_preferences.jsonl")
    ckpt = tmp_path / "dpo run"
    result = run_lora_recipe("finetune_Qwen3-8B-dpo.sh", model, pairs, ckpt, "--micro-batch-size 1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = read_checkpoint_weights(str(ckpt))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert "rewards/accuracies=" in result.stdout and "logps/chosen=" in result.stdout, result.stdout[-2000:]


def test_long_context_recipe_trains_a_quantised_base_with_offload_and_the_chunked_loss(setup, tmp_path):
    """finetune_Llama-3.1-8B-long-qlora.sh on a tiny Llama (a pipeline of two on CPU, short windows): NF4 base,
    every block checkpointed with its inputs offloaded, the head inside the loss; the adapters train."""
    pytest.importorskip("bitsandbytes")
    root, _, data, _ = setup
    model = make_model(root / "llama-long", model_type="llama", hidden=32, layers=2, heads=4)
    recipe = open(os.path.join(REPO, "finetune_Llama-3.1-8B-long-qlora.sh")).read()
    for flag in ("--activation-offload cpu", "--chunked-loss on", "--activation-checkpointing full", "--compile"):
        assert flag in recipe
    ckpt = tmp_path / "long run"
    result = run_lora_recipe("finetune_Llama-3.1-8B-long-qlora.sh", model, data, ckpt, "--gradient-accumulate-step 1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = read_checkpoint_weights(str(ckpt))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k)  # B starts at 0: it trained
