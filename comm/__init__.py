"""Process groups and failure handling: see process_groups.py (launch, layout, groups) and watchdog.py."""

from .process_groups import LaunchError, Layout, init_distributed, rank_to_coords

__all__ = ["Layout", "LaunchError", "init_distributed", "rank_to_coords"]
