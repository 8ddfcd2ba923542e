"""The README's first command: the CPU demo script trains (loss falls), evaluates, checkpoints and exports."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, checkpoint_entries, free_port

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
    assert checkpoint_entries(tmp_path / "checkpoints") == ["checkpoint_4", "checkpoint_8", "latest"]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # README's last demo step: talk to the export (an 8-step model says little, but it answers and exits 0)
    chat = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "chat.py"), str(tmp_path / "hf-export"), "--prompt", "Hello?"]
        + ["--max-new-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip(), chat.stderr[-2000:]


@pytest.mark.e2e
def test_demo_runs_again_and_again_but_keeps_other_runs_checkpoints(tmp_path):
    """README command 1 twice in a row: the second run replaces the demo's own earlier output and succeeds. A folder
    the demo did not make keeps its checkpoints: --load-checkpoint false still refuses to replace them."""

    def demo(out):
        env = dict(os.environ, OUT=str(out), DEMO_STEPS="2")
        return subprocess.run(
            ["bash", os.path.join(REPO, "examples", "demo_cpu.sh"), "--evaluation-steps", "0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=540,
        )

    out = tmp_path / "demo"
    for run in range(2):
        result = demo(out)
        assert result.returncode == 0, (run, result.stdout[-3000:] + result.stderr[-3000:])
        assert "step 2 loss=" in result.stdout, result.stdout[-3000:]
        assert checkpoint_entries(out / "checkpoints") == ["checkpoint_2", "latest"]
        assert (out / "hf-export" / "config.json").is_file()

    other = tmp_path / "other"  # another run's checkpoints where the demo would write
    os.makedirs(other / "checkpoints" / "checkpoint_5")
    (other / "checkpoints" / "latest").write_text("5\n")
    result = demo(other)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint-path"), result.stderr[-3000:]
    assert "holds another run's checkpoints" in result.stderr
    assert checkpoint_entries(other / "checkpoints") == ["checkpoint_5", "latest"]
