"""Throughput, MFU, memory and ETA for the step log."""
import time

import torch

# Dense bf16/fp16 tensor-core peak per GPU (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
              "V100": 125e12}


def peak_flops(device):
    """(flops/s, label) of one device, or (None, reason) where unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, f"{key} bf16 dense {value / 1e12:.0f} TFLOP/s"
    return None, name


class StepMeter:
    def __init__(self, device, flops_per_token, world_size, total_steps, start_step):
        self.device = device
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.total_steps = total_steps
        self.peak, self.peak_label = peak_flops(device)
        self.started = time.perf_counter()
        self.last = self.started
        self.start_step = start_step
        self.last_step = start_step

    def exclude(self, seconds):
        """Leave time spent outside training steps (evaluation, checkpoints) out of the next throughput figure."""
        self.last += seconds

    def measure(self, step, tokens_per_step):
        """Metrics since the last call; `tokens_per_step` = tokens one optimizer step trains across the job."""
        now = time.perf_counter()
        seconds = now - self.last
        tokens = tokens_per_step * (step - self.last_step)
        self.last, self.last_step = now, step
        values = {"tokens_per_s": tokens / seconds, "step_s": seconds}
        if self.peak:
            values["mfu"] = tokens * self.flops_per_token / seconds / (self.world_size * self.peak)
        if self.device.type == "cuda":
            values["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        done = step - self.start_step
        if done > 0:
            values["eta_min"] = (now - self.started) / done * (self.total_steps - step) / 60
        return values
