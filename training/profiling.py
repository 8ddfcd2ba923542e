"""--profiling: tidy_profiling writes Chrome Trace Event JSON (pid = rank, one lane per kind of work);
pytorch_profiling uses torch.profiler. Both trace --profiling-steps optimizer steps after one warm-up step (the
first step also runs the pipeline's shape inference and any compilation). memory_profiling records the CUDA caching
allocator's history (every allocation and free, with its Python stack) from the run's first step through
--profiling-steps more, and writes torch's snapshot of it per rank, `memory_rank_R.pickle`, to drop on
https://pytorch.org/memory_viz: what is alive at the peak, and which line allocated it.

tidy_profiling spans: per micro-batch forward and backward compute of every stage on this rank (module hooks), the
send/recv gaps the pipeline schedule spends between them ("wait" lane: time outside compute inside an iteration),
the data-parallel all-reduce and the optimizer. One file per rank, and rank 0 merges them all into `merged.json`.
"""

import contextlib
import glob
import json
import os
import time

import torch
import torch.distributed as dist

from config import ProfilingConfig

LANES = {"forward": 1, "backward": 2, "wait": 3, "dp_allreduce": 4, "optimizer": 5, "iteration": 6}


class NoProfiler:
    def span(self, name):
        return contextlib.nullcontext()

    def step(self, step):
        return contextlib.nullcontext()

    def finish(self):
        pass


class TidyProfiler:
    def __init__(self, out_dir, layout, stage_modules, steps):
        self.out_dir = out_dir
        self.layout = layout
        self.steps = steps
        self.first_step = None
        self.events = []
        self.active = False
        self.cuda = layout.device.type == "cuda"
        self.open_spans = {}
        self.micro = {}
        for module in stage_modules:
            module.register_forward_pre_hook(lambda m, a: self._begin(("forward", id(m))))
            module.register_forward_hook(lambda m, a, o: self._end(("forward", id(m)), m))
            module.register_full_backward_pre_hook(lambda m, g: self._begin(("backward", id(m))))
            module.register_full_backward_hook(lambda m, gi, go: self._end(("backward", id(m)), m))

    def _now_us(self):
        if self.cuda:
            torch.cuda.synchronize(self.layout.device)  # host clocks only mean something after the GPU caught up
        return time.perf_counter() * 1e6

    def _begin(self, key):
        if self.active:
            self.open_spans[key] = self._now_us()

    def _end(self, key, module):
        if not self.active or key not in self.open_spans:
            return
        start = self.open_spans.pop(key)
        index = self.micro.get(key, 0)
        self.micro[key] = index + 1
        name = getattr(module, "stage_name", None) or type(module).__name__
        self._add(key[0], f"{key[0]} {name} mb{index}", start, self._now_us())

    def _add(self, lane, name, start, end):
        self.events.append(
            {
                "name": name,
                "ph": "X",
                "pid": self.layout.rank,
                "tid": LANES[lane],
                "ts": start,
                "dur": max(0.0, end - start),
                "args": {"lane": lane},
            }
        )

    @contextlib.contextmanager
    def span(self, name):
        if not self.active:
            yield
            return
        start = self._now_us()
        yield
        self._add(name, name, start, self._now_us())

    @contextlib.contextmanager
    def step(self, step):
        self.first_step = step if self.first_step is None else self.first_step
        self.active = 1 <= step - self.first_step <= self.steps
        self.micro = {}
        yield
        self.active = False

    def _wait_spans(self):
        """Time inside each iteration not spent in this rank's forward/backward compute."""
        compute = sorted(
            (e["ts"], e["ts"] + e["dur"]) for e in self.events if e["args"]["lane"] in ("forward", "backward")
        )
        for it in [e for e in self.events if e["args"]["lane"] == "iteration"]:
            cursor, end = it["ts"], it["ts"] + it["dur"]
            for start, stop in compute:
                if stop <= cursor or start >= end:
                    continue
                if start > cursor:
                    self._add("wait", "wait", cursor, start)
                cursor = max(cursor, stop)
            if end > cursor:
                self._add("wait", "wait", cursor, end)

    def finish(self):
        self._wait_spans()
        os.makedirs(self.out_dir, exist_ok=True)
        rank = self.layout.rank
        meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": lane}}
            for lane, tid in LANES.items()
        ]
        path = os.path.join(self.out_dir, f"rank_{rank}.json")
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)
        dist.barrier()
        if rank == 0:
            merged = []
            for other in sorted(glob.glob(os.path.join(self.out_dir, "rank_*.json"))):
                merged += json.load(open(other))["traceEvents"]
            with open(os.path.join(self.out_dir, "merged.json"), "w") as f:
                json.dump({"traceEvents": merged, "displayTimeUnit": "ms"}, f)


class TorchProfiler(NoProfiler):
    def __init__(self, out_dir, layout, steps):
        self.out_dir = out_dir
        self.layout = layout
        activities = [torch.profiler.ProfilerActivity.CPU]
        if layout.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._export,
        )
        self.profiler.start()
        self.running = True

    def span(self, name):
        return torch.profiler.record_function(name) if self.running else contextlib.nullcontext()

    @contextlib.contextmanager
    def step(self, step):
        yield
        if self.running:
            self.profiler.step()

    def _export(self, profiler):
        os.makedirs(self.out_dir, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(self.out_dir, f"torch_rank_{self.layout.rank}.json"))
        summary = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        with open(os.path.join(self.out_dir, f"torch_rank_{self.layout.rank}_summary.txt"), "w") as f:
            f.write(summary)

    def finish(self):
        if self.running:
            self.running = False
            self.profiler.stop()


class MemoryProfiler(NoProfiler):
    ENTRIES = 1_000_000  # allocation events kept (the oldest are dropped beyond)

    def __init__(self, out_dir, layout, steps):
        self.path = os.path.join(out_dir, f"memory_rank_{layout.rank}.pickle")
        self.steps_left = steps + 1  # the first step too: its peak is often the run's
        torch.cuda.memory._record_memory_history(max_entries=self.ENTRIES)
        self.running = True

    @contextlib.contextmanager
    def step(self, step):
        yield
        self.steps_left -= 1
        if self.steps_left == 0:
            self.finish()

    def finish(self):
        if self.running:
            self.running = False
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            torch.cuda.memory._dump_snapshot(self.path)
            torch.cuda.memory._record_memory_history(enabled=None)


def make_profiler(cfg: ProfilingConfig, layout, stage_modules):
    if cfg.mode == "tidy_profiling":
        return TidyProfiler(cfg.directory, layout, stage_modules, cfg.steps)
    if cfg.mode == "pytorch_profiling":
        return TorchProfiler(cfg.directory, layout, cfg.steps)
    if cfg.mode == "memory_profiling":
        return MemoryProfiler(cfg.directory, layout, cfg.steps)
    return NoProfiler()
