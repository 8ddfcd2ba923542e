"""What a run writes about its steps: each step's metrics line (written one step late, so that logging never leaves
the GPU idle), the start-up line, the checkpoints' timing records and the curves drawn beside the checkpoints."""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from comm import Layout
from config import LogConfig
from training.curves import MetricsError, plot_metrics
from training.metrics import PendingStepLog, StepMeter
from training.startup import StartupClock
from utils.logging import one_line


class StepLog:
    """The logging rank writes; every rank calls `step` (the loss and memory reductions are collective)."""

    def __init__(self, cfg: LogConfig, log, layout: Layout, meter: StepMeter, clock: StartupClock):
        self.cfg, self.log, self.layout, self.meter, self.clock = cfg, log, layout, meter, clock
        self.pending: PendingStepLog | None = None  # the last step's values, written after the next step is under way
        self.curves: threading.Thread | None = None  # the thread drawing curves.png

    def startup(self, step: int) -> None:
        """After this process's first step: its start-up phases, one line and one metrics record."""
        if self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)  # the first step's kernels (and compilation) have run
        self.clock.lap("first_step")
        self.log.record(step, {"startup_s": self.clock.since_start()}, self.clock.line())

    def step(self, step: int, loss: torch.Tensor | None, values: dict, tokens_per_step: int) -> None:
        """Queue step `step`'s line (`loss`: the step's global mean token loss on the last-stage ranks, still on the
        device) after writing the one queued before it."""
        self.write()
        lay = self.layout
        tensors = {} if loss is None else {"loss": loss}
        if lay.device.type == "cuda":
            mine = torch.tensor([torch.cuda.max_memory_allocated(lay.device) / 2**30], device=lay.device)
            gathered = [torch.zeros_like(mine) for _ in range(lay.world_size)]
            dist.all_gather(gathered, mine)
            tensors["memory"] = torch.cat(gathered)
        if lay.is_logger:  # timed here, at the step's end on the host, however late the line is written
            values.update(self.meter.measure(step, tokens_per_step))
            if step == self.meter.start_step + 1:
                values["launch_to_first_step_s"] = time.time() - self.clock.start
        self.pending = PendingStepLog(step, values, tensors)

    def write(self) -> None:
        """The queued step's line, once its values are on the host; only the logging rank writes."""
        pending, self.pending = self.pending, None
        if pending is None or not self.layout.is_logger:
            return
        host = pending.wait()
        values = {"loss": host["loss"].item() if "loss" in host else None, **pending.values}
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
        """The run's metrics as a PNG beside its checkpoints, drawn by a background thread: the first plot imports
        matplotlib (seconds), and the other ranks would wait for the logging rank meanwhile. One at a time; a plot
        never stops training."""
        if not self.layout.is_logger:
            return
        if self.curves is not None:
            self.curves.join()
        self.curves = threading.Thread(target=self._plot, name="curves", daemon=True)
        self.curves.start()

    def _plot(self) -> None:
        try:
            plot_metrics([self.cfg.metrics_file], self.cfg.curves_file)
        except (MetricsError, OSError, ValueError) as exc:
            self.log.info(f"WARNING: could not draw {self.cfg.curves_file}: {one_line(exc)}")

    def close(self) -> None:
        if self.curves is not None:
            self.curves.join()  # the final curves, drawn while the other ranks finished
        self.log.close()
