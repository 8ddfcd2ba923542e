"""Process groups and failure handling: see process_groups.py (launch, layout, groups) and watchdog.py."""

__all__ = ["Layout", "LaunchError", "init_distributed", "rank_to_coords"]


def __getattr__(name):
    # process_groups loads torch (about a second): imported on first use, so that the entrypoint's launcher check
    # (comm.launch) leaves --help and the flag checks torch-free
    if name in __all__:
        from . import process_groups

        return getattr(process_groups, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
