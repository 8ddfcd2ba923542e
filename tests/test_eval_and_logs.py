"""Evaluation equals the transformers model's loss; one process logs; profiling writes Chrome traces."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import base_flags, document_logits, eval_batches, make_chat_data, make_model, run_job
from training.startup import PHASES

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evallogs")
    model_dir = make_model(root / "model", hidden=32, layers=4, heads=4)
    return root, model_dir, make_chat_data(root / "chat.jsonl"), make_chat_data(root / "eval.jsonl", n=30, seed=3)


def reference_eval_loss(model_dir, eval_path, seq_length, batch_size, train_on_inputs=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches([eval_path], tokenizer, seq_length, batch_size, train_on_inputs=train_on_inputs):
            logits = document_logits(model, batch)  # evaluation masks packed documents as training does
            total += F.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += (batch["labels"] != -100).sum().item()
    return total / count


def test_evaluation_loss_matches_transformers_and_one_rank_logs(setup):
    """pp=2 x dp=2, lr 0: valid.loss after step 1 is the untouched model's mean token loss on the eval file, over
    the tokens training learns (--train-on-inputs: the user turns too)."""
    root, model_dir, data, eval_path = setup
    metrics = root / "metrics.jsonl"
    flags = base_flags(
        model_dir,
        data,
        str(root / "ck"),
        **{
            "pipeline-group-size": 2,
            "data-group-size": 2,
            "batch-size": 2,
            "total-steps": 2,
            "lr": 0.0,
            "evaluation-data": eval_path,
            "evaluation-steps": 1,
            "metrics-file": str(metrics),
            "train-on-inputs": True,
        },
    )
    result = run_job(4, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(metrics)]
    evals = [r for r in records if "valid.loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    want = reference_eval_loss(model_dir, eval_path, 32, 4, train_on_inputs=True)
    assert abs(want - reference_eval_loss(model_dir, eval_path, 32, 4)) > 1e-4 * want  # the flag matters
    assert evals[0]["valid.loss"] == pytest.approx(want, rel=1e-5)
    assert evals[0]["valid.perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    # one logging process: each step line printed once in the output of all 4 ranks
    step_lines = [line for line in result.stdout.splitlines() if " step 1 loss=" in line]
    assert len(step_lines) == 1, result.stdout[-3000:]
    assert (result.stdout + result.stderr).count("MFU is not reported") == 1  # CPU: no peak, said once
    # the logging rank's start-up phases: one record after the first step, every phase, times since launch rising
    startup = [r for r in records if "startup_s" in r]
    assert len(startup) == 1 and startup[0]["step"] == 1
    phases = startup[0]["startup_s"]
    assert list(phases) == list(PHASES)
    times = list(phases.values())
    assert times[0] > 0 and times == sorted(times)
    first = next(r for r in records if r["step"] == 1 and "loss" in r)
    assert times[-1] <= first["launch_to_first_step_s"]  # the first step's record comes after the start-up's
    assert result.stdout.count("start-up, seconds since launch: imports") == 1


def test_tidy_profiling_writes_per_rank_and_merged_traces(setup):
    root, model_dir, data, _ = setup
    out = root / "profiles"
    flags = base_flags(
        model_dir,
        data,
        str(root / "ck-prof"),
        **{
            "pipeline-group-size": 2,
            "pp-mode": "1f1b",
            "total-steps": 3,
            "profiling": "tidy_profiling",
            "profiling-dir": str(out),
            "profiling-steps": 1,
            "masked-attention": "varlen",  # a GPU's choice: here it says, once, that it does not apply
        },
    )
    result = run_job(2, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "--masked-attention varlen does not apply" in line]
    assert len(warnings) == 1, result.stdout[-3000:]
    assert sorted(os.listdir(out)) == ["merged.json", "rank_0.json", "rank_1.json"]
    events = [e for e in json.load(open(out / "merged.json"))["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1}
    lanes = {(e["pid"], e["args"]["lane"]) for e in events}
    for rank in (0, 1):
        for lane in ("forward", "backward", "optimizer", "iteration"):
            assert (rank, lane) in lanes, (rank, lane)
    forwards = [e for e in events if e["pid"] == 0 and e["args"]["lane"] == "forward"]
    assert len(forwards) == 4  # one per micro-batch of the one profiled step (after the warm-up step)
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in events)


def test_pytorch_profiling_writes_trace_and_summary(setup):
    root, model_dir, data, _ = setup
    out = root / "torch-profiles"
    flags = base_flags(
        model_dir,
        data,
        str(root / "ck-torchprof"),
        **{"total-steps": 3, "profiling": "pytorch_profiling", "profiling-dir": str(out), "profiling-steps": 1},
    )
    result = run_job(1, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["torch_rank_0.json", "torch_rank_0_summary.txt"]
    names = {e.get("name") for e in json.load(open(out / "torch_rank_0.json"))["traceEvents"]}
    assert {"optimizer", "iteration"} <= names


def test_wandb_offline_one_run_per_job_without_secrets(setup, tmp_path):
    """pp=2 x dp=2 (4 processes) with the wandb backend: exactly one offline run, named by WANDB_NAME, holding the
    step metrics; an API key in the environment never reaches the run's files."""
    pytest.importorskip("wandb")
    root, model_dir, data, _ = setup
    flags = base_flags(
        model_dir,
        data,
        str(tmp_path / "ck"),
        **{
            "pipeline-group-size": 2,
            "data-group-size": 2,
            "batch-size": 2,
            "total-steps": 2,
            "train-log-backend": "wandb",
            "project-name": "unit-test",
        },
    )
    secret = "0123456789abcdef0123456789abcdef01234567"
    result = run_job(
        4,
        flags,
        env={
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path),
            "WANDB_NAME": "one-run",
            "WANDB_API_KEY": secret,
            "WANDB_SILENT": "true",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, runs
    run_dir = tmp_path / "wandb" / runs[0]
    blobs = b"".join(p.read_bytes() for p in run_dir.rglob("*") if p.is_file())
    assert b"one-run" in blobs and b"grad_norm" in blobs
    assert secret.encode() not in blobs
    assert secret not in result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's history")
def test_memory_profiling_writes_a_snapshot_after_its_steps(tmp_path):
    from comm import Layout
    from training.profiling import MemoryProfiler

    layout = Layout(0, 1, 1, 1, 0, 0, 0, torch.device("cuda", 0))
    profiler = MemoryProfiler(str(tmp_path), layout, steps=1)
    for step in range(3):  # the first step, one more, and one after the recording ended
        with profiler.step(step):
            torch.ones(1 << 20, device="cuda").sum().item()
    path = tmp_path / "memory_rank_0.pickle"
    assert path.stat().st_size > 0 and not profiler.running
