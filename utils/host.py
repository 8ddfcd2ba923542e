"""What this host gives one rank: the ranks that share it, their share of its cores, its available memory."""

import os


def local_ranks() -> int:
    """Processes of this job on this host (torchrun's LOCAL_WORLD_SIZE; a rank launched on its own counts alone)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a job scheduler's share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def cores_per_rank() -> int:
    """This process's share of the cores it may run on, divided among the job's ranks on this host."""
    return max(1, usable_cores() // local_ranks())


def host_memory_available():
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
