"""What a run writes about its steps: each step's metrics line (written one step late, so that logging never leaves
the GPU idle), the start-up line, the checkpoints' timing records and the curves drawn beside the checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from comm import Layout
from config import LogConfig
from training.metrics import PendingStepLog, StepMeter
from training.startup import StartupClock

CURVES_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "plot_metrics.py")


class StepLog:
    """The logging rank writes; every rank calls `step` (the loss and memory reductions are collective)."""

    def __init__(self, cfg: LogConfig, log, layout: Layout, meter: StepMeter, clock: StartupClock):
        self.cfg, self.log, self.layout, self.meter, self.clock = cfg, log, layout, meter, clock
        self.pending: PendingStepLog | None = None  # the last step's values, written after the next step is under way
        self.curves: subprocess.Popen | None = None  # the process drawing curves.png

    def startup(self, step: int) -> None:
        """After this process's first step: its start-up phases, one line and one metrics record."""
        if self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)  # the first step's kernels (and compilation) have run
        self.clock.lap("first_step")
        self.log.record(step, {"startup_s": self.clock.since_start()}, self.clock.line())

    def step(
        self, step: int, loss: torch.Tensor | None, values: dict, tokens_per_step: int, trained: int | None = None
    ) -> None:
        """Queue step `step`'s line (`loss`: the step's global mean token loss on the last-stage ranks, still on the
        device, as `values` may hold 0-d tensors; `tokens_per_step`, or `trained`: the tokens the job trained since
        the last line where steps differ (pairs), for tokens/s and MFU on the logging rank) after writing the one
        queued before it."""
        self.write()
        lay = self.layout
        tensors = {key: value for key, value in values.items() if torch.is_tensor(value)}
        if loss is not None:
            tensors["loss"] = loss
        if lay.device.type == "cuda":
            # a fill, not a copy from the host (that would wait for the GPU)
            mine = torch.full((1,), torch.cuda.max_memory_allocated(lay.device) / 2**30, device=lay.device)
            if lay.world_size > 1:  # a world of one needs no collective
                gathered = [torch.zeros_like(mine) for _ in range(lay.world_size)]
                dist.all_gather(gathered, mine)
                mine = torch.cat(gathered)
            tensors["memory"] = mine
        if lay.is_logger:  # timed here, at the step's end on the host, however late the line is written
            values.update(self.meter.measure(step, tokens_per_step, trained))
            if step == self.meter.start_step + 1:
                values["launch_to_first_step_s"] = time.time() - self.clock.start
        self.pending = PendingStepLog(step, values, tensors)

    def write(self) -> None:
        """The queued step's line, once its values are on the host; only the logging rank writes."""
        pending, self.pending = self.pending, None
        if pending is None or not self.layout.is_logger:
            return
        host = pending.wait()
        values = {"loss": None, **pending.values}
        for key in values.keys() & host.keys():  # the loss and the optimizer's device values, now on the host
            values[key] = host[key].item()
        if values.pop("skipped", False):  # written only on a step that was skipped
            values["skipped"] = 1
        if "memory" in host:
            values["mem_gb_per_rank"] = [round(m, 2) for m in host["memory"].tolist()]
        self.log.metrics(pending.step, values)

    def write_if_ready(self) -> None:
        """After a failure: the last good step's line is not lost, if its values arrived."""
        if self.pending is not None and self.pending.ready():
            self.write()

    def records(self, step: int, records: list[dict]) -> None:
        """Records that are not a step's line (checkpoint timings), under step `step`."""
        for values in records:
            if self.layout.is_logger:
                self.log.metrics(step, values)

    def draw_curves(self) -> None:
        """The run's metrics as a PNG beside its checkpoints, drawn by tools/plot_metrics.py in a process of its own:
        drawn in a thread here it held the interpreter lock for about a second per checkpoint (matplotlib), which
        the training loop's own Python waited on, and the other ranks with it. One at a time (a draw still running
        is left to finish: the next one includes its steps); a plot never stops training."""
        if not self.layout.is_logger or self._curves_running():
            return
        command = [sys.executable, CURVES_TOOL, self.cfg.metrics_file, "--output", self.cfg.curves_file]
        self.curves = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _curves_running(self) -> bool:
        """Whether the last draw is still running; once it has ended, its failure (if any) is logged, once."""
        if self.curves is None or self.curves.poll() is None:
            return self.curves is not None
        error = self.curves.stderr.read().strip().splitlines()
        if self.curves.returncode != 0:
            reason = error[-1].removeprefix("plot_metrics: error: ") if error else f"exit {self.curves.returncode}"
            self.log.info(f"WARNING: could not draw {self.cfg.curves_file}: {reason}")
        self.curves.stderr.close()
        self.curves = None
        return False

    def close(self) -> None:
        if self.curves is not None:
            self.curves.wait()  # the final curves, drawn while the other ranks finished
            self._curves_running()
        self.log.close()
