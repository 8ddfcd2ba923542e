"""The README's first command: the CPU demo script trains (loss falls), evaluates, checkpoints and exports."""

import json
import os
import subprocess

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint


def test_demo_script_runs_and_exports(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    env = dict(os.environ, OUT=str(tmp_path), DEMO_STEPS="8", MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [
            "bash",
            os.path.join(REPO, "examples", "demo_cpu.sh"),
            "--metrics-file",
            str(metrics),
            "--train-log-backend",
            "loguru",
            "--evaluation-steps",
            "8",
            "--checkpoint-steps",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(metrics)]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]  # logged every 5 steps, and at the last one
    assert any("valid.loss" in r for r in records)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_4", "checkpoint_8", "latest"]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
