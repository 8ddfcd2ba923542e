"""Pipeline x data-parallel fine-tuning of causal LMs (Qwen, Llama, Mistral, Gemma, Phi, GPT-NeoX, GPT-J).

Launch one process per rank (`--rank R --world-size W --dist-url tcp://HOST:PORT --cuda-id G`), or under torchrun,
which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, or with `--nproc-per-node N` (launcher mode,
comm/launch.py: checks the flags, then starts this node's N workers as torchrun would). See README.md.
"""

import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Pipeline stages hold activations of many sizes at once; expandable segments keep the CUDA caching allocator
# from fragmenting near the memory limit (20B on 80 GB cards). A user's own setting wins. Set before torch loads.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# c10d's C++ warnings (a rank reaching for the store of a rank that already stopped) print 20-line native stack
# traces around the one error line that matters; errors still show. A user's own setting wins (INFO, WARNING).
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from checkpoint.preflight import refuse_replacing
from config import ArgumentError, JobConfig, load_job
from utils.errors import UserError
from utils.logging import error_line, one_line


def checked_job(argv: list[str] | None) -> JobConfig:
    """The run's settings, refused in one line (ArgumentError) before torch loads when they cannot work."""
    job = load_job(argv)
    refuse_replacing(job.checkpoint)
    return job


def out_of_memory_line(oom: BaseException, job: JobConfig) -> str:
    """Torch's own figures (what it tried to allocate, what was free) and what lowers peak memory for these flags."""
    figures = one_line(oom).split(" Including non-PyTorch memory")[0]  # the rest is allocator tuning advice
    fixes = []
    if job.pipeline.mode == "gpipe" and job.dist.pipeline_size > 1:
        fixes.append("--pp-mode 1f1b (gpipe keeps every micro-batch's activations until the backward)")
    if job.data.micro_batch_size > 1:
        fixes.append(f"a --micro-batch-size below {job.data.micro_batch_size}")
    checkpointing = job.model.activation_checkpointing
    if checkpointing != "full":
        fixes.append("--activation-checkpointing " + ("full" if checkpointing == "selective" else "selective or full"))
    if job.optimizer.kind != "8bit-adam":
        fixes.append("--optimizer 8bit-adam")
    fixes.append("more pipeline stages (--pipeline-group-size)")
    return f"out of GPU memory ({figures}); to lower peak memory use {', '.join(fixes)}"


def describe_failure(exc: BaseException, job: JobConfig) -> tuple[str, int]:
    """The error line and exit status for an exception that ended training: 2 for the user's input or a layout
    that does not fit (one line says it all), 1 for our own bugs (the traceback is printed too).
    torch.distributed.pipelining wraps whatever a stage raises in a multi-line RuntimeError, so look underneath."""
    import torch

    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in chain:
        if isinstance(cause, torch.OutOfMemoryError):
            return out_of_memory_line(cause, job), 2
    for cause in chain:
        if isinstance(cause, UserError):
            return one_line(cause), 2
    return f"{type(chain[-1]).__name__}: {one_line(chain[-1])}", 1


def main(argv: list[str] | None = None) -> int:
    try:
        job = checked_job(argv)
    except ArgumentError as exc:
        error_line(str(exc))
        return 2

    import torch.distributed as dist

    from comm.watchdog import failure_of_another_rank, report_failure
    from training.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(job)
        trainer.train()
        trainer.close()
        return 0
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception as exc:  # one line for the user; the traceback only for our own bugs
        rank = os.environ.get("RANK", job.dist.rank if job.dist.rank is not None else 0)
        first_failure = failure_of_another_rank(int(rank)) if dist.is_initialized() else None
        if first_failure:
            error_line(f"[rank {rank}] stopping: {first_failure}")
            return 1
        line, code = describe_failure(exc, job)
        if code == 1:
            traceback.print_exc()
        error_line(f"[rank {rank}] {line}")
        if dist.is_initialized():
            report_failure(rank, line)
        return code
    finally:
        if dist.is_initialized() and trainer is not None and trainer.watchdog.stopped.is_set():
            dist.destroy_process_group()


if __name__ == "__main__":
    from comm.launch import wants_launcher

    if wants_launcher(sys.argv[1:]):  # launcher mode: start the workers of this node (see comm/launch.py)
        from comm import launch

        code = launch.main(os.path.abspath(__file__), sys.argv[1:], run_here=main)
    else:
        code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: after a failure, background threads (data workers, process-group internals) must not keep the
    # process alive while the other ranks are being stopped.
    os._exit(code)
