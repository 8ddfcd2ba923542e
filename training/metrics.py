"""Throughput, MFU, memory and ETA for the step log."""

import time

import torch

# Dense bf16/fp16 tensor-core peak per GPU (vendor datasheets, without sparsity). Keys are whole words of the name
# torch reports ("NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"); the key with the most words wins, so an H100 PCIe
# or NVL card gets its own peak rather than the SXM one under plain "H100".
PEAK_FLOPS = {
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "H800 PCIe": 756e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def _words(name: str) -> list[str]:
    return name.lower().replace("-", " ").split()


def peak_for_name(name: str):
    """(flops/s, label) for a GPU name, or (None, label saying MFU is not reported) where no peak is known."""
    words = _words(name)

    def named(key):  # the key's words appear in a row in the name
        k = _words(key)
        return any(words[i : i + len(k)] == k for i in range(len(words) - len(k) + 1))

    matches = [key for key in PEAK_FLOPS if named(key)]
    if not matches:
        return None, f"not known for {name}, so MFU is not reported"
    best = max(matches, key=lambda key: len(_words(key)))
    return PEAK_FLOPS[best], f"{best} bf16 dense {PEAK_FLOPS[best] / 1e12:.0f} TFLOP/s"


def peak_flops(device):
    """(flops/s, label) of one device, or (None, label saying MFU is not reported) for CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None, "not known for CPU, so MFU is not reported"
    return peak_for_name(torch.cuda.get_device_name(device))


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

    def measure(self, step, tokens_per_step, trained=None):
        """Metrics since the last call; `tokens_per_step` = tokens one optimizer step trains across the job, or
        `trained` = the tokens the job trained since the last call (every replica's) where steps differ (pairs)."""
        now = time.perf_counter()
        seconds = now - self.last
        tokens = trained if trained is not None else tokens_per_step * (step - self.last_step)
        self.last, self.last_step = now, step
        values = {"tokens_per_s": tokens / seconds, "step_s": seconds}
        if self.peak:
            values["mfu"] = tokens * self.flops_per_token / seconds / (self.world_size * self.peak)
        if self.device.type == "cuda":
            values["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        done = step - self.start_step
        if done > 0:
            values["eta_min"] = (now - self.started) / done * (self.total_steps - step) / 60
        return values


class PendingStepLog:
    """One step's metrics on their way to the host. The device values are copied without waiting for the GPU and
    an event marks the copies; `wait()` blocks only until they are done, which by the next step's end they are."""

    def __init__(self, step, values, tensors):
        self.step, self.values = step, values
        # non_blocking device -> host copies land in pinned memory; on the CPU they are plain copies
        self.host = {key: t.detach().to("cpu", non_blocking=True) for key, t in tensors.items()}
        self.event = None
        if any(t.is_cuda for t in tensors.values()):
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self):
        return self.event is None or self.event.query()

    def wait(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host
