"""training/metrics.py: the peak FLOP/s behind MFU for each GPU name torch reports, and no MFU where none is known;
the metrics file of a resumed run."""

import json
import types

import pytest
import torch

from training import metrics

CUDA = types.SimpleNamespace(type="cuda")


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H800", 989),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA A800-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
    ],
)
def test_peak_of_each_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    peak, label = metrics.peak_flops(CUDA)
    assert peak == tflops * 1e12, (name, label)
    assert f"{tflops} TFLOP/s" in label


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA L40", "NVIDIA H20"])
def test_unknown_gpu_says_mfu_is_not_reported(monkeypatch, name):
    """Names that merely contain a listed one ("L4" in "L40", "H20" in "H200") are not that card."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert metrics.peak_flops(CUDA) == (None, f"not known for {name}, so MFU is not reported")


def test_cpu_run_logs_no_mfu():
    meter = metrics.StepMeter(torch.device("cpu"), flops_per_token=1e6, world_size=1, total_steps=10, start_step=0)
    assert meter.peak is None and "MFU is not reported" in meter.peak_label
    values = meter.measure(1, tokens_per_step=100)
    assert "mfu" not in values and values["tokens_per_s"] > 0


def test_a_resumed_run_keeps_each_step_once_in_the_metrics_file(tmp_path):
    """A run killed after step 5 with its last checkpoint at step 3 wrote steps 4 and 5 (and a torn line); the
    resumed run drops them before writing steps 4 onward again."""
    from config import LogConfig
    from utils.logging import make_logger

    path = tmp_path / "metrics.jsonl"
    log = make_logger(LogConfig(metrics_file=str(path)), True, {})
    for step in range(1, 6):
        log.metrics(step, {"loss": float(step)})
    log.close()
    with open(path, "a") as f:
        f.write('{"loss": 6.0, "st')  # killed mid-line
    log = make_logger(LogConfig(metrics_file=str(path)), True, {})
    log.resume_at(3)
    log.metrics(4, {"loss": 40.0})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
