"""Fault injection for the tests: every hook the training code honours, in one place.

Each is an environment variable read at the moment it could fire. The checkpoint hooks fire only on torchrun's first
attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job runs clean.

  CKPT_FAULT_AFTER_FILES=N[:STEP[:RANK]]  os._exit(9) after writing N files of a save (of STEP, on RANK)
  CKPT_FAULT_OSERROR=STEP[:RANK]           writing the save of STEP (on RANK) fails with ENOSPC (disk full)
  CKPT_HOLD_AFTER_SAVE=STEP:SECONDS        every rank sleeps after the save of STEP completed (to kill it there)
  CKPT_SLOW_WRITE=STEP:SECONDS             every rank sleeps before writing the first file of the save of STEP (a slow
                                           disk: kill a job while a background write is in flight)
  INJECT_INF_GRAD=STEP:RANK                one gradient is inf on RANK at optimizer step STEP (overflow handling)
"""

import errno
import os
import sys
import time

SAVE_CRASH = "CKPT_FAULT_AFTER_FILES"
SAVE_OSERROR = "CKPT_FAULT_OSERROR"
HOLD_AFTER_SAVE = "CKPT_HOLD_AFTER_SAVE"
SLOW_WRITE = "CKPT_SLOW_WRITE"
INF_GRADIENT = "INJECT_INF_GRAD"
# The launcher mode restarts a single node's workers itself (comm/launch.py): each attempt's elastic agent counts
# from 0, so the attempt is passed down here.
ATTEMPT = "LAUNCHER_ATTEMPT"


def _fields(name, first_attempt_only=True):
    """The ":"-separated fields of hook `name`, or None when unset (or, for checkpoint hooks, on a restart)."""
    spec = os.environ.get(name)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or os.environ.get(ATTEMPT, "0") != "0"
    if not spec or (first_attempt_only and restarted):
        return None
    return spec.split(":")


def _targets(fields, step, rank):
    """Whether optional fields [STEP, RANK] ("" or absent: any) name this step and rank."""
    return all(x == "" or int(x) == want for x, want in zip(fields, (step, rank)))


def before_checkpoint_file(step, rank, path):
    """CKPT_FAULT_OSERROR: the write of `path` fails as on a full disk."""
    fields = _fields(SAVE_OSERROR)
    if fields and _targets(fields, step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({SAVE_OSERROR})", path)


def before_checkpoint_files(step):
    """CKPT_SLOW_WRITE: the save of STEP takes SECONDS longer, before any of its files is written."""
    fields = _fields(SLOW_WRITE)
    if fields and int(fields[0]) == step:
        time.sleep(float(fields[1]))


def after_checkpoint_files(step, rank, files_written):
    """CKPT_FAULT_AFTER_FILES: the process dies in the middle of a save."""
    fields = _fields(SAVE_CRASH)
    if fields and _targets(fields[1:], step, rank) and files_written >= int(fields[0]):
        sys.stderr.write(f"[rank {rank}] {SAVE_CRASH}: simulated crash while saving\n")
        sys.stderr.flush()
        os._exit(9)


def after_checkpoint(step):
    """CKPT_HOLD_AFTER_SAVE: pause after a completed save, so a test can kill the job right there."""
    fields = _fields(HOLD_AFTER_SAVE)
    if fields and int(fields[0]) == step:
        time.sleep(float(fields[1]))


def arm_inf_gradient(rank, param, current_step):
    """INJECT_INF_GRAD: on the named rank, a hook making `param`'s gradient inf during optimizer step STEP (counted
    from 1; `current_step()` says which step runs). Registered before the data-parallel reducer's hook, it runs first,
    so the inf is in the gradient before its bucket is reduced."""
    fields = _fields(INF_GRADIENT, first_attempt_only=False)
    if not fields or int(fields[1]) != rank:
        return

    def poison(p):
        if current_step() == int(fields[0]):
            p.grad.view(-1)[0] = float("inf")

    param.register_post_accumulate_grad_hook(poison)
