"""Launcher mode of the entrypoint: `python3 dist_lm_pretrain_and_finetune.py --nproc-per-node N [...] FLAGS`.

It does what torchrun does (one elastic agent per node, c10d rendezvous, restarts) with two differences users see:
the training flags and paths are checked once before any worker starts, and a failure ends with one line, the first
failing rank's `error:` line, instead of torchrun's ChildFailedError traceback. Plain `torchrun` still works; its
report then names the cause (workers write torch.distributed.elastic's error file, see utils.logging.error_line).
One worker on one node without restarts trains in the launcher's own process: an agent and a second interpreter
would only add their start-up (importing torch twice) to the time before the first step.
"""

import argparse
import logging
import os
import sys

from utils.faults import ATTEMPT
from utils.logging import error_line

LAUNCHER_FLAGS = ("--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--max-restarts")


def wants_launcher(argv):
    return any(a.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for a in argv)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (launcher flags: {', '.join(LAUNCHER_FLAGS)})\n")


def split_argv(argv):
    """(launcher options, the training flags that every worker gets)."""
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument(
        "--nproc-per-node", "--nproc_per_node", type=int, required=True, help="worker processes on this node"
    )
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (one launcher per node)")
    parser.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        default=None,
        help="HOST:PORT every node's launcher meets at (needed with --nnodes > 1)",
    )
    parser.add_argument("--rdzv-id", "--rdzv_id", default="finetune", help="job id, the same on every node")
    parser.add_argument(
        "--max-restarts", "--max_restarts", type=int, default=0, help="restart every worker up to N times on a failure"
    )
    return parser.parse_known_args(argv)


def _check(opts):
    if opts.nproc_per_node < 1 or opts.nnodes < 1 or opts.max_restarts < 0:
        return "--nproc-per-node and --nnodes must be >= 1 and --max-restarts >= 0"
    if opts.nnodes > 1 and not opts.rdzv_endpoint:
        return f"--nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT of node 0 (the same on every node)"
    return None


def _when(failure):
    """When a rank wrote its error line (utils.logging keeps sub-second time; torch's timestamp is whole seconds,
    and the rank that failed first and the ranks it stopped usually share that second)."""
    message = failure.message if isinstance(failure.message, dict) else {}
    return float(message.get("extraInfo", {}).get("time", failure.timestamp))


def first_failure_line(failed):
    """The `error:` line of torch.distributed.elastic's ChildFailedError: the earliest failure that left a message
    (a rank's own error line; the ranks it stopped write theirs later), else the earliest exit."""
    with_message = {r: f for r, f in failed.failures.items() if isinstance(f.message, dict)}  # read from its file
    failures = with_message or failed.failures
    rank = min(failures, key=lambda r: (_when(failures[r]), r))
    failure = failures[rank]
    if rank in with_message:
        return failure.message.get("message", ""), failure.exitcode
    how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return f"rank {rank} ended with {how} and no error line; see its output above", failure.exitcode


def main(entrypoint, argv, run_here):
    """Start this node's workers of `entrypoint` with the training flags of `argv`, or call `run_here(flags)` when
    the job is one process without restarts. Returns the exit status."""
    from checkpoint.preflight import refuse_replacing
    from config import ArgumentError, load_job

    opts, flags = split_argv(argv)
    problem = _check(opts)
    if problem:
        error_line(problem)
        return 2
    try:  # every worker checks them again; this way a bad flag costs no worker start and prints once
        job = load_job(flags)
        dist = job.dist
        if dist.rank is not None:
            raise ArgumentError("--rank is given by the launcher; drop it (or drop --nproc-per-node and launch ranks)")
        world = opts.nproc_per_node * opts.nnodes
        groups = dist.pipeline_size * dist.data_size * dist.context_size
        if world != groups:
            cp = f" x --context-parallel-size {dist.context_size}" if dist.context_size > 1 else ""
            raise ArgumentError(
                f"--nnodes {opts.nnodes} x --nproc-per-node {opts.nproc_per_node} = {world} processes, but "
                f"--pipeline-group-size {dist.pipeline_size} x --data-group-size {dist.data_size}{cp} = "
                f"{groups}; make them equal"
            )
        refuse_replacing(job.checkpoint)
    except ArgumentError as exc:
        error_line(str(exc))
        return 2
    if world == 1 and opts.max_restarts == 0:
        return run_here(flags)

    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401 - its logger, quieted below
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # A fresh worker store per attempt: a restarted attempt must not meet the dead workers' keys (see README).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if opts.nproc_per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N workers must not oversubscribe cores
    # The agent's own log lines (SIGTERMs sent, the failure table) would bury the workers' error lines.
    # (torch gives some of its loggers a level of their own, so set each one, not only the parent)
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # One node restarts its workers here, attempt by attempt, so that a user error (exit 2: the same flags and
    # files fail the same way again) is not retried. Several nodes must restart together: the agents' own restarts.
    own_restarts = opts.nnodes == 1
    config = LaunchConfig(
        min_nodes=opts.nnodes,
        max_nodes=opts.nnodes,
        nproc_per_node=opts.nproc_per_node,
        run_id=opts.rdzv_id,
        rdzv_endpoint=opts.rdzv_endpoint or "localhost:0",
        rdzv_backend="c10d",
        max_restarts=0 if own_restarts else opts.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    if opts.nnodes > 1:  # the agent's own logs are off: say what this node waits for (up to 600 s, torch's default)
        print(
            f"launcher: {opts.nproc_per_node} workers here; waiting for {opts.nnodes} nodes at {opts.rdzv_endpoint} "
            f"(--rdzv-id {opts.rdzv_id})",
            flush=True,
        )
    attempts = opts.max_restarts + 1 if own_restarts else 1
    try:
        for attempt in range(attempts):
            os.environ[ATTEMPT] = str(attempt)  # the workers inherit it (test fault hooks fire on the first only)
            try:
                elastic_launch(config, entrypoint=sys.executable)(entrypoint, *flags)
                return 0
            except ChildFailedError as failed:
                line, code = first_failure_line(failed)
                if code != 2 and attempt + 1 < attempts:
                    print(f"launcher: restart {attempt + 1} of {opts.max_restarts} after: {line}", flush=True)
                    continue
                error_line(line)
                return code if code > 0 else 1
    except (KeyboardInterrupt, SignalException) as exc:  # Ctrl-C, or scancel / kill: the workers are stopped
        error_line(f"launcher: stopped by {getattr(exc, 'sigval', None) and exc.sigval.name or 'Ctrl-C'}")
        return 130
    except Exception as exc:  # noqa: BLE001 - the rendezvous (no other node, a port in use): one line
        first = (str(exc).strip().splitlines() or [""])[0]
        error_line(
            f"launcher: {type(exc).__name__}: {first}; check --rdzv-endpoint {opts.rdzv_endpoint or 'localhost:0'} "
            f"(the same HOST:PORT on every node) and that all {opts.nnodes} node(s) started"
        )
        return 1
    return 0  # not reached: every attempt returns
