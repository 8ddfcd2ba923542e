"""Progress bars for long waits (weight loading, checkpoints, export, token counting).

    for name, tensor in progress(items, desc="loading weights", total=n, is_logger=lay.is_logger):
        ...

A bar is drawn only by the logging rank, and only when the terminal will show it: bars go to stderr, so they are on
when stderr is a terminal. SHOW_PROGRESS=1 forces them on (a log file then gets tqdm's lines), SHOW_PROGRESS=0 off.
Without tqdm installed the iterable is returned unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

ENV = "SHOW_PROGRESS"


def progress_enabled(is_logger: bool = True) -> bool:
    """Whether a bar would be drawn here: logging rank, then SHOW_PROGRESS, then whether stderr is a terminal."""
    if not is_logger:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    is_logger: bool = True,
) -> Iterable[T] | Iterator[T]:
    """`iterable`, wrapped in a tqdm bar when progress_enabled(is_logger); else `iterable` itself."""
    if not progress_enabled(is_logger):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # bars are a convenience: never a reason to stop
        return iterable
    # leave=False: a finished bar disappears instead of filling the log between the step lines.
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
