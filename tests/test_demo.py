"""The README's first command: the CPU demo script trains (loss falls), evaluates, checkpoints and exports."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, checkpoint_entries, free_port

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint


def demo(out, *flags, steps=2):
    env = dict(os.environ, OUT=str(out), DEMO_STEPS=str(steps), MASTER_PORT=str(free_port()))
    return subprocess.run(
        ["bash", os.path.join(REPO, "examples", "demo_cpu.sh"), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )


def test_demo_runs_exports_and_runs_again_but_keeps_other_runs_checkpoints(tmp_path):
    """README command 1: the demo trains (loss falls), evaluates, checkpoints, exports a model transformers loads and
    chat answers from. Run again, it replaces its own earlier output and succeeds. A folder the demo did not make
    keeps its checkpoints: --load-checkpoint false still refuses to replace them."""
    out, metrics = tmp_path / "demo", tmp_path / "metrics.jsonl"
    result = demo(
        out,
        *["--metrics-file", str(metrics), "--train-log-backend", "loguru"],
        *["--evaluation-steps", "8", "--checkpoint-steps", "4"],
        steps=8,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(metrics)]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]  # logged every 5 steps, and at the last one
    assert any("valid.loss" in r for r in records)
    assert checkpoint_entries(out / "checkpoints") == ["checkpoint_4", "checkpoint_8", "latest"]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "hf-export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # README's last demo step: talk to the export (an 8-step model says little, but it answers and exits 0)
    chat = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "chat.py"), str(out / "hf-export"), "--prompt", "Hello?"]
        + ["--max-new-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip(), chat.stderr[-2000:]

    result = demo(out, "--evaluation-steps", "0")  # again, in the same place
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 2 loss=" in result.stdout, result.stdout[-3000:]
    assert checkpoint_entries(out / "checkpoints") == ["checkpoint_2", "latest"]
    assert (out / "hf-export" / "config.json").is_file()

    other = tmp_path / "other"  # another run's checkpoints where the demo would write
    os.makedirs(other / "checkpoints" / "checkpoint_5")
    shutil.copytree(out / "tiny-gptneox", other / "tiny-gptneox")  # the demo's model is there: one launch less
    (other / "checkpoints" / "latest").write_text("5\n")
    result = demo(other, "--evaluation-steps", "0")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint-path"), result.stderr[-3000:]
    assert "holds another run's checkpoints" in result.stderr
    assert checkpoint_entries(other / "checkpoints") == ["checkpoint_5", "latest"]
