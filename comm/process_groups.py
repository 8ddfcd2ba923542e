"""Process groups: one world of pp x dp x cp ranks, pipelines on contiguous ranks, data-parallel groups strided.

A pipeline replica g = dp_rank x cp + cp_rank runs on ranks [g x pp, (g + 1) x pp): the cp replicas of one
data-parallel replica read the same batches and split each sequence between them (context_parallel/)."""

import datetime
import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import DistConfig
from utils.errors import UserError
from utils.logging import error_line


class LaunchError(UserError, RuntimeError):
    """The launch environment is inconsistent; the message says what to change."""


@dataclass
class Layout:
    rank: int
    world_size: int
    pp_size: int
    dp_size: int
    pp_rank: int
    dp_rank: int
    local_rank: int
    device: torch.device
    pp_group: object = None  # ProcessGroup of this rank's pipeline
    dp_group: object = None  # ProcessGroup of the ranks holding the same stage (and the same cp rank)
    ends_group: object = None  # first + last stage of this pipeline (tied embeddings), when requested
    commit_group: object = None  # every rank, gloo: checkpoint commits only (a background writer's collectives)
    status_group: object = None  # every rank, gloo: the training thread's per-step check on a background write
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: object = None  # the ranks splitting this rank's sequences between them (--context-parallel-size)
    replica_group: object = None  # cp > 1: every rank holding this stage, dp x cp of them

    @property
    def grad_size(self) -> int:
        """Ranks whose gradients of this stage are summed (and whose optimizer state --dp-mode sharded splits)."""
        return self.dp_size * self.cp_size

    @property
    def grad_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def grad_group(self):
        return self.replica_group if self.cp_size > 1 else self.dp_group

    @property
    def is_last_stage(self):
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logger(self):
        """The one rank that logs: the last stage of replica 0 (it sees the loss)."""
        return self.grad_rank == 0 and self.is_last_stage


def rank_to_coords(rank, pp_size):
    """OpenChatKit's mapping: pipelines are contiguous ranks. (pp_rank, pipeline replica)."""
    return rank % pp_size, rank // pp_size


def _launch_env(cfg: DistConfig):
    """(rank, world_size, local_rank, init_method) from torchrun's variables or from the flags."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cfg.rank is not None and cfg.rank != rank:
            raise LaunchError(f"--rank {cfg.rank} disagrees with torchrun's RANK={rank}; drop --rank under torchrun")
        return rank, world, local_rank, "env://"
    if cfg.rank is None:
        if cfg.pipeline_size * cfg.data_size * cfg.context_size != 1:
            raise LaunchError("not under torchrun: pass --rank R (and --world-size, --dist-url) to each process")
        return 0, 1, 0, cfg.dist_url
    world = cfg.world_size or cfg.pipeline_size * cfg.data_size * cfg.context_size
    return cfg.rank, world, cfg.cuda_id if cfg.cuda_id is not None else 0, cfg.dist_url


START_GRACE_S = 10


def _rendezvous_within(init_method, rank, world, timeout, where):
    """The store every rank meets at (as init_process_group would make it), but a rank stuck here exits with one
    line after --dist-timeout + START_GRACE_S. torch's own timeout does not cover every case: an address that
    accepts connections but is not rank 0's store (another job holds the port and rank 0 failed on it) keeps a
    rank waiting for ever, and the watchdog only starts once the group is up."""
    seconds = timeout.total_seconds() + START_GRACE_S

    def give_up():
        error_line(
            f"[rank {rank}] no rendezvous at {where} within {seconds:.0f} s (--dist-timeout + "
            f"{START_GRACE_S} s): is rank 0 running, and is that its address and port?"
        )
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        store, _, _ = next(dist.rendezvous(init_method, rank, world, timeout=timeout))
    finally:
        timer.cancel()
    store.set_timeout(timeout)
    return dist.PrefixStore("default_pg", store)  # the prefix init_process_group gives the store it makes itself


def _meet(init_method, rank, world, timeout):
    """The rendezvous store of the ranks, failures of it said in one line (LaunchError)."""
    timeout_s = timeout.total_seconds()
    where = (
        init_method
        if init_method != "env://"
        else (f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}")
    )
    try:
        store = _rendezvous_within(init_method, rank, world, timeout, where)
    except dist.DistNetworkError as exc:
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
            raise LaunchError(
                f"rank 0 cannot listen on {where}: the port is in use (another job?); pick a free "
                f"port (--dist-url, torchrun --rdzv-endpoint / --master_port, or the recipe's "
                f"MASTER_PORT)"
            ) from None
        if "timed out" in str(exc):
            raise LaunchError(
                f"rank {rank} could not reach rank 0 at {where} within --dist-timeout "
                f"{timeout_s:g} s: is rank 0 running (or did it fail first?), and is the address "
                f"right?"
            ) from None
        raise
    except dist.DistStoreError as exc:
        if "waiting for clients" not in str(exc):
            raise
        raise LaunchError(
            f"rank 0 waited {timeout_s:g} s at {where} but not every one of the {world} ranks "
            f"joined ({str(exc).splitlines()[0]}); start them all with the same address (or did one fail "
            f"first?)"
        ) from None
    return store


def init_distributed(cfg: DistConfig, ends_group=False):
    """Create the world and the pipeline / data-parallel groups (and, with `ends_group`, a group of each
    pipeline's first and last stage, for tied embeddings). Returns the Layout of this rank."""
    if cfg.net_interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", cfg.net_interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", cfg.net_interface)
    rank, world, local_rank, init_method = _launch_env(cfg)
    pp, dp, cp = cfg.pipeline_size, cfg.data_size, cfg.context_size
    if world != pp * dp * cp:
        sizes = f"--pipeline-group-size {pp} x --data-group-size {dp}" + (f" x --context-parallel-size {cp}" * (cp > 1))
        raise LaunchError(f"world size {world} != {sizes}; launch {pp * dp * cp} processes or change the group sizes")
    if not 0 <= rank < world:
        raise LaunchError(f"--rank {rank} is outside 0..{world - 1}")

    use_cuda = cfg.use_cuda
    if use_cuda and not torch.cuda.is_available():  # never fall back to a CPU run on a GPU node without saying so
        raise LaunchError(
            f"--use-cuda true but torch {torch.__version__} sees no GPU (a CPU-only build, no driver, "
            f"or CUDA_VISIBLE_DEVICES hides them); fix that, or pass --use-cuda false to train on CPU"
        )
    if use_cuda:
        cuda_id = cfg.cuda_id if cfg.cuda_id is not None else local_rank
        if cuda_id >= torch.cuda.device_count():
            raise LaunchError(
                f"--cuda-id {cuda_id} but this machine has {torch.cuda.device_count()} GPU(s); "
                f"launch fewer processes per node or fix --cuda-id"
            )
        torch.cuda.set_device(cuda_id)
        device = torch.device("cuda", cuda_id)
        backend = "nccl" if cfg.backend == "nccl" else "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if world == 1 and init_method != "env://":
        # One process without torchrun: nobody meets it, so it needs no port (two one-GPU jobs on a machine would
        # both reach for --dist-url's).
        store = dist.PrefixStore("default_pg", dist.HashStore())
    else:
        store = _meet(init_method, rank, world, timeout)
    kwargs = dict(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if use_cuda and backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init: errors surface at start, not at the first collective
    dist.init_process_group(**kwargs)

    pp_rank, replica = rank_to_coords(rank, pp)
    layout = Layout(rank, world, pp, dp, pp_rank, replica // cp, local_rank, device, cp_size=cp, cp_rank=replica % cp)
    # Every rank must create every group, in the same order.
    for g in range(dp * cp):
        group = dist.new_group([g * pp + s for s in range(pp)], timeout=timeout)
        if g == replica:
            layout.pp_group = group
    for stage in range(pp):
        for c in range(cp):
            group = dist.new_group([(d * cp + c) * pp + stage for d in range(dp)], timeout=timeout)
            if (stage, c) == (pp_rank, layout.cp_rank):
                layout.dp_group = group
    if cp > 1:
        for stage in range(pp):
            for d in range(dp):
                group = dist.new_group([(d * cp + c) * pp + stage for c in range(cp)], timeout=timeout)
                if (stage, d) == (pp_rank, layout.dp_rank):
                    layout.cp_group = group
            group = dist.new_group([g * pp + stage for g in range(dp * cp)], timeout=timeout)
            if stage == pp_rank:
                layout.replica_group = group
    if ends_group and pp > 1:
        for g in range(dp * cp):
            group = dist.new_group([g * pp, g * pp + pp - 1], timeout=timeout)
            if g == replica and pp_rank in (0, pp - 1):
                layout.ends_group = group
    # Checkpoint commits run in a background thread: their collectives must never share a group (and its ordering)
    # with the training thread's. gloo takes CPU tensors whatever the training backend is.
    layout.commit_group = dist.new_group(list(range(world)), timeout=timeout, backend="gloo")
    # The training thread asks after every step whether that write is done everywhere: on the host, through a group
    # of its own, so the question costs no device synchronisation (an NCCL collective would).
    layout.status_group = dist.new_group(list(range(world)), timeout=timeout, backend="gloo")
    return layout
