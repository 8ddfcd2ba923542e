"""Bad flags: one line naming the flag and the fix, exit code 2, no traceback, nothing on disk touched.

In-process: the entrypoint's main() with these flags returns before any process group (or torch) is needed.
tests/test_cli.py proves the same output from a real process, and covers the inputs found later.
"""

import json
import os

import pytest

import dist_lm_pretrain_and_finetune as entrypoint
from tests.helpers import base_flags, make_chat_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model folder as the flag checks see it (config.json and the tokenizer) and chat data."""
    from tools import make_tiny_model

    root = tmp_path_factory.mktemp("flags")
    make_tiny_model.main(["--output", str(root / "model"), "--hidden-size", "32", "--num-layers", "4"])
    return root, str(root / "model"), make_chat_data(root / "chat.jsonl")


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def run_main(flags, capsys):
    code = entrypoint.main(flags)  # argparse's own errors too: they come back as the exit status, not SystemExit
    return Result(code, capsys.readouterr().err)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# Caught by validate_args before torch is even imported.
FLAG_ERRORS = [
    ({"batch-size": 3, "micro-batch-size": 2}, ["--batch-size 3", "--micro-batch-size 2"]),
    ({"fp16": True, "bf16": True}, ["--fp16", "--bf16"]),
    ({"world-size": 3, "pipeline-group-size": 2}, ["--world-size 3", "= 2"]),
    ({"pp-mode": "interleaved-1f1b"}, ["interleaved-1f1b", "--pipeline-group-size"]),
    ({"pp-mode": "1f1b", "pipeline-group-size": 4, "batch-size": 2}, ["1f1b", "micro-batches"]),
    ({"total-steps": None}, ["--total-steps"]),
    ({"total-steps": 5, "gradient-accumulate-step": 2}, ["--total-steps 5", "--gradient-accumulate-step 2"]),
    ({"train-warmup-steps": 5}, ["--train-warmup-steps"]),
    ({"evaluation-steps": 2}, ["--evaluation-data"]),
    ({"seq-length": 0}, ["--seq-length"]),
    ({"loss-scale": -1}, ["--loss-scale"]),
    ({"model-name": "/nonexistent/model"}, ["--model-name /nonexistent/model"]),
    ({"lr": "nan"}, ["--lr must be a finite number"]),
    ({"max-grad-norm": "nan"}, ["--max-grad-norm must be a finite number"]),
    ({"total-steps": 3, "nepochs": 2}, ["--total-steps", "--nepochs", "one of them"]),
    ({"evaluation-num-batch": 0}, ["--evaluation-num-batch"]),
    ({"data-workers": -1}, ["--data-workers must be >= 0", "got -1"]),
    ({"dist-url": "127.0.0.1:7055"}, ["--dist-url 127.0.0.1:7055", "tcp://HOST:PORT"]),
    ({"net-interface": "bogus0"}, ["--net-interface bogus0", "no such network interface"]),
    ({"metrics-file": "/dev/null/m.jsonl"}, ["--metrics-file", "/dev/null is not a directory"]),
    ({"checkpoint-path": "/dev/null/ck"}, ["--checkpoint-path /dev/null/ck", "/dev/null is not a directory"]),
    ({"lora-r": -1}, ["--lora-r must be >= 0"]),
    ({"quantize-base": "nf4"}, ["--quantize-base needs adapters", "--lora-r"]),
    ({"lora-target-modules": "q_proj"}, ["--lora-target-modules needs adapters"]),
    ({"lora-r": 4, "lora-dropout": 1.5}, ["--lora-dropout must be in [0, 1)"]),
    ({"lora-r": 4, "lora-alpha": 0}, ["--lora-alpha must be > 0"]),
    ({"lora-r": 4, "lora-init": "/nonexistent"}, ["--lora-init /nonexistent", "adapter_config.json"]),
    ({"dpo-beta": 0.2}, ["--dpo-beta is a setting of --objective dpo", "not of --objective sft"]),
    ({"objective": "simpo", "orpo-lambda": 0.5}, ["--orpo-lambda is a setting of --objective orpo"]),
    ({"objective": "dpo", "dpo-label-smoothing": 0.5}, ["--dpo-label-smoothing 0.5", "below 0.5"]),
    ({"objective": "dpo", "dpo-reference": "adapters"}, ["--dpo-reference adapters needs LoRA", "--lora-r"]),
    ({"objective": "orpo", "train-on-inputs": True}, ["--train-on-inputs does not apply to --objective orpo"]),
    ({"objective": "kto"}, ["--objective", "kto"]),
    # --fp8 on this CPU machine: the GPU refusal comes first, whether or not torchao is installed.
    (
        {"fp8": "tensorwise", "bf16": True},
        ["--fp8 needs an NVIDIA GPU with compute capability 8.9+", "--use-cuda false"],
    ),
    ({"fp8": "rowwise", "use-cuda": "true"}, ["--fp8 rowwise trains a bf16 model", "add --bf16"]),
    ({"activation-offload": "cpu"}, ["--activation-offload cpu", "add --activation-checkpointing full"]),
    ({"profiling": "memory_profiling"}, ["--profiling memory_profiling records the GPU", "--use-cuda false"]),
    ({"data-cache": "c", "objective": "dpo"}, ["--data-cache keeps SFT token windows", "--objective dpo reads pairs"]),
    ({"fp8": "tensorwise", "use-cuda": "true", "fp16": True}, ["--fp8 tensorwise", "replace --fp16 with --bf16"]),
    ({"fp8": "tensorwise", "use-cuda": "true", "bf16": True, "lora-r": 8}, ["--fp8 tensorwise and LoRA adapters"]),
    (
        {"fp8": "tensorwise", "use-cuda": "true", "bf16": True, "seq-length": 30},
        ["--micro-batch-size x --seq-length to be a multiple of 16", "got 1 x 30"],
    ),
]


@pytest.mark.parametrize("overrides,fragments", FLAG_ERRORS, ids=[str(i) for i in range(len(FLAG_ERRORS))])
def test_bad_flags_exit_2_with_one_line(setup, tmp_path, capsys, overrides, fragments):
    _, model_dir, data = setup
    result = run_main(base_flags(model_dir, data, str(tmp_path / "ck"), **overrides), capsys)
    assert_one_line_error(result, *fragments)


def test_fp8_without_torchao_says_how_to_install(setup, tmp_path, capsys, monkeypatch):
    """Checked without importing torchao (it takes seconds), whether or not this machine has it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    _, model_dir, data = setup
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), fp8="tensorwise", bf16=True, **{"use-cuda": "true"})
    assert_one_line_error(run_main(flags, capsys), "--fp8 tensorwise", "needs torchao: pip install torchao")


def test_argparse_rejects_unknown_choice(setup, tmp_path, capsys, monkeypatch):
    """Under torchrun the line also goes into the worker's error file, so torchrun's failure report names it."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    _, model_dir, data = setup
    result = run_main(base_flags(model_dir, data, str(tmp_path / "ck"), **{"pp-mode": "zero-bubble"}), capsys)
    assert_one_line_error(result, "--pp-mode", "invalid choice: 'zero-bubble'", "see --help")
    assert "usage:" not in result.stderr
    recorded = json.loads(error_file.read_text())["message"]["message"]
    assert "invalid choice: 'zero-bubble'" in recorded and "see --help" in recorded


def test_load_checkpoint_false_never_replaces_another_runs_checkpoints(setup, tmp_path, capsys):
    _, model_dir, data = setup
    ckpt = tmp_path / "used"
    (ckpt / "checkpoint_2").mkdir(parents=True)
    (ckpt / "checkpoint_2" / "meta.json").write_text("{}")
    (ckpt / "latest").write_text("2\n")
    result = run_main(base_flags(model_dir, data, str(ckpt), **{"load-checkpoint": "false"}), capsys)
    assert_one_line_error(result, f"--checkpoint-path {ckpt} holds another run's checkpoints", "new --checkpoint-path")
    assert sorted(os.listdir(ckpt)) == ["checkpoint_2", "latest"] and (ckpt / "latest").read_text() == "2\n"
