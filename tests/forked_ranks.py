"""Ranks of the entrypoint started as forks of a process that has already imported torch, transformers and the
training code (multiprocessing's fork server), instead of fresh interpreters that import them again.

Each rank is still a process of its own (its own pid, address space, gloo sockets; it can be killed alone) running
the entrypoint script as `python dist_lm_pretrain_and_finetune.py ...` would, with exactly the environment, working
directory and arguments given; only the imports are done once, in the server, rather than once per rank: ~4-6 s
of CPU each on 2 cores, most of a short test run. Module-level state the imports leave behind is none that a run
changes: environment variables the imports read are set in the server the way every launch sets them (RANK_ENV).
Tests of the entrypoint's own launch (torchrun, launcher mode, the shell scripts) start fresh interpreters.
"""

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "dist_lm_pretrain_and_finetune.py")
# What every rank launch sets (run_job, run_ranks), and what the entrypoint sets before torch loads: in the server
# before its imports, as libgomp and c10 read them when torch loads.
RANK_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.pipelining",  # imported by pp > 1 ranks only (pipeline_parallel/schedule.py)
    "transformers",
    "tests.forked_ranks",
    "training.loop",
    "comm.launch",
]

_context = None


def start_server():
    """The fork server's context, its server started (once per test session) under RANK_ENV."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(RANK_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _run_entrypoint(argv, env, cwd, out_path, err_path):
    """In the fork: become `python ENTRYPOINT *argv` with `env` in `cwd`, output into the two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(
            line_buffering=True, write_through=True
        )  # as PYTHONUNBUFFERED: a killed rank keeps its lines
    sys.argv = [ENTRYPOINT, *argv]
    runpy.run_path(ENTRYPOINT, run_name="__main__")  # ends in os._exit(code), as the script does


class ForkedRank:
    """One rank, with the part of subprocess.Popen's interface the tests use (pid, poll, wait, kill, send_signal,
    communicate, returncode); its stdout and stderr go to the two files named."""

    def __init__(self, argv, env, cwd, out_path, err_path):
        self.args, self.out_path, self.err_path = [sys.executable, ENTRYPOINT, *argv], out_path, err_path
        self.process = start_server().Process(target=_run_entrypoint, args=(argv, env, cwd, out_path, err_path))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self):
        return self.process.exitcode  # -N when killed by signal N, as Popen's

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.process.kill()

    def output(self):
        """(stdout, stderr) written so far."""
        with open(self.out_path) as out, open(self.err_path) as err:
            return out.read(), err.read()

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output()


def _run_function(target, args, rank, world, port, err_path, backend):
    """In the fork: join a `backend` group of `world` ranks and run target(rank, world, *args); a failure's
    traceback goes to `err_path` and the exit code is 1."""
    import traceback

    import torch.distributed as dist

    code = 0
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        target(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:
        with open(err_path, "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)


def run_function_ranks(world, target, args, tmp_dir, port, timeout=120, backend="gloo"):
    """target(rank, world, *args) (a module-level function) in `world` forked processes joined in one group.
    Returns each rank's traceback ("" when it succeeded); a rank still running after `timeout` (its peers failed) is
    killed and reported as such."""
    errors = [os.path.join(tmp_dir, f"rank{r}.err") for r in range(world)]
    procs = [
        start_server().Process(target=_run_function, args=(target, args, r, world, port, errors[r], backend))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    out = []
    for p, path in zip(procs, errors):
        if p.exitcode is None:
            p.kill()
            out.append(f"killed after {timeout} s")
        elif p.exitcode != 0:
            out.append(open(path).read() if os.path.exists(path) else f"exit code {p.exitcode}")
        else:
            out.append("")
    return out
