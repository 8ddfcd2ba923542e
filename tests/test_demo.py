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
    """Run examples/demo_cpu.sh into `out`; steps=None runs the README's demo as it is (its own step count)."""
    env = dict(os.environ, OUT=str(out), MASTER_PORT=str(free_port()))
    env.pop("DEMO_STEPS", None)
    if steps is not None:
        env["DEMO_STEPS"] = str(steps)
    return subprocess.run(
        ["bash", os.path.join(REPO, "examples", "demo_cpu.sh"), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )


def test_demo_learns_the_bundled_facts_exports_and_runs_again_but_keeps_other_runs_checkpoints(tmp_path):
    """README command 1, as it is (about 2 minutes): the demo trains (loss falls), evaluates, checkpoints, exports a
    model transformers loads, and the export answers questions from the bundled data (greedy), in the demo's own
    closing exchange and in tools/chat.py. Run again, it replaces its own earlier output and succeeds. A folder the
    demo did not make keeps its checkpoints: --load-checkpoint false still refuses to replace them."""
    out = tmp_path / "demo"
    result = demo(out, "--train-log-backend", "loguru", steps=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and losses[0] > 5 and losses[-1] < 0.5, losses  # logged every 10 of 200 steps
    valid = [r["valid.loss"] for r in records if "valid.loss" in r]
    assert len(valid) == 4 and valid[-1] < 0.5, valid  # every 50 steps
    assert checkpoint_entries(out / "checkpoints") == ["checkpoint_100", "checkpoint_150", "checkpoint_200", "latest"]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "hf-export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the demo's closing exchange: a bundled question, answered from what it learned
    lines = result.stdout.splitlines()
    asked = lines.index(">>> What is the capital of France?")
    assert "Paris" in lines[asked + 1], result.stdout[-3000:]
    # README's last demo step: talk to the export; another bundled question, greedy
    chat = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "chat.py"), str(out / "hf-export")]
        + ["--prompt", "How many legs does a spider have?", "--max-new-tokens", "32", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "eight" in chat.stdout, chat.stdout + chat.stderr[-2000:]

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
