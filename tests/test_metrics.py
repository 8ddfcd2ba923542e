"""training/metrics.py: the peak FLOP/s behind MFU for each GPU name torch reports, and no MFU where none is known."""

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
