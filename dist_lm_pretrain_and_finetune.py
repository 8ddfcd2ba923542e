"""Pipeline x data-parallel fine-tuning of causal LMs (GPT-NeoX, GPT-J, Llama).

Launch one process per rank (`--rank R --world-size W --dist-url tcp://HOST:PORT --cuda-id G`), or under torchrun,
which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. See README.md.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Pipeline stages hold activations of many sizes at once; expandable segments keep the CUDA caching allocator
# from fragmenting near the memory limit (20B on 80 GB cards). A user's own setting wins. Set before torch loads.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from utils.args import ArgumentError, parse_args, validate_args  # noqa: E402
from utils.logging import error_line  # noqa: E402


def user_error_types():
    """Errors whose message is the whole story (bad flags, files, data, checkpoints, layouts): one line, no
    traceback, exit 2."""
    from comm import LaunchError
    from modules import ModelError
    from optimizer import OptimizerError
    from pipeline_parallel import LayoutError
    from tasks import TaskError
    from utils.checkpoint import CheckpointError
    return (ArgumentError, LaunchError, ModelError, OptimizerError, LayoutError, TaskError, CheckpointError)


def main(argv=None):
    args = parse_args(argv)
    try:
        validate_args(args)
    except ArgumentError as exc:
        error_line(str(exc))
        return 2

    import torch.distributed as dist

    from comm.watchdog import report_failure
    from training.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(args)
        trainer.train()
        trainer.close()
        return 0
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception as exc:  # one line for the user; the traceback only for our own bugs
        rank = os.environ.get("RANK", args.rank if args.rank is not None else 0)
        user_error = isinstance(exc, user_error_types())
        if not user_error:
            traceback.print_exc()
        error_line(f"[rank {rank}] {exc}" if user_error else f"[rank {rank}] {type(exc).__name__}: {exc}")
        if dist.is_initialized():
            report_failure(rank, f"{type(exc).__name__}: {exc}")
        return 2 if user_error else 1
    finally:
        if dist.is_initialized() and trainer is not None and trainer.watchdog.stopped.is_set():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: after a failure, background threads (data workers, process-group internals) must not keep the
    # process alive while the other ranks are being stopped.
    os._exit(code)
