"""`--task-name` parsing: comma-separated ``path[:weight]`` entries, as in OpenChatKit.

A path is a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` / ``.arrow`` file, a directory of them (top level only, sorted
by name; the directory is one task), a ``Dataset.save_to_disk`` folder, or ``hf:ORG/NAME[@split][#config]`` (read
with ``datasets.load_dataset(..., streaming=True)``). Weights default to 1.0 and are normalised to sum to 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from utils.errors import UserError

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")
KINDS = ".jsonl, .jsonl.gz, .parquet or .arrow"


class TaskError(UserError, ValueError):
    """A problem with the task data or spec, phrased so the user knows what to fix."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the entry's path as written (made unique with "#n" if repeated)
    path: str  # absolute path of the file or directory
    weight: float  # normalised sampling weight
    raw_weight: float  # weight as written
    files: tuple[str, ...]  # absolute paths of the data files, sorted (an hf: source: its one "hf:..." name)


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES) and not os.path.basename(name).startswith(".")


def _files_of(entry: str, path: str, where: str) -> tuple[str, ...]:
    from . import sources  # sources imports TaskError from here

    if sources.is_hf(path):
        src = sources.parse_hf(f"{where} '{entry}'", path)
        sources.load_hf(src)  # a missing, empty or unknown split/config fails here, in one line
        return (src.path,)
    if os.path.isdir(path):
        saved = sources.save_to_disk_files(path, entry)
        if saved is not None:
            return saved
        files = tuple(
            sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if is_data_file(f) and os.path.isfile(os.path.join(path, f))
            )
        )
        if not files:
            raise TaskError(
                f"{where} '{entry}': directory {path} holds no {KINDS} files; "
                f"put the data files directly in it or name the files themselves"
            )
    elif os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise TaskError(
                f"{where} '{entry}': {path} is not a {KINDS} file; rename it "
                f"(.jsonl: one JSON object per line) or point at a directory of data files"
            )
        files = (path,)
    else:
        raise TaskError(
            f"{where} '{entry}': no such file or directory {path!r}; give a .jsonl/.jsonl.gz/.parquet/.arrow "
            f"file, a directory of them, a save_to_disk folder or hf:ORG/NAME (named tasks like 'cot' are not built in)"
        )
    for f in files:
        if sources.is_rows(f):
            sources.schema_of(f)  # not parquet / not arrow: one line now, not mid-training
    return files


def parse_task_spec(spec: str | list[str] | tuple[str, ...], flag: str = "--task-name") -> list[TaskSpec]:
    """Parse ``"a.jsonl:0.5,dir/,b.jsonl.gz"`` into TaskSpecs with normalised weights.

    Raises TaskError (a ValueError) naming `flag`, the bad entry and the fix.
    """
    if isinstance(spec, (list, tuple)):
        entries = [str(e) for e in spec]
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise TaskError(
                f"{flag} is empty; give comma-separated path[:weight] entries, "
                f"e.g. {flag} data/chat.jsonl:0.8,data/extra/:0.2"
            )
        entries = spec.split(",")
    parsed = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(entries, 1):
        entry = raw.strip()
        where = f"{flag} entry {i}"
        if not entry:
            raise TaskError(
                f"{where} is empty (two commas in a row or a trailing comma?); remove it or give path[:weight]"
            )
        path, weight_text = entry, None
        if entry.startswith("hf:"):  # hub names hold no ':', so a last one past the prefix starts the weight
            if ":" in entry[3:]:
                path, weight_text = entry.rsplit(":", 1)
                weight_text = weight_text.strip()
        elif not os.path.exists(os.path.expanduser(entry)) and ":" in entry:
            path, weight_text = entry.rsplit(":", 1)
            path = path.strip()
            weight_text = weight_text.strip()
        weight = 1.0
        if weight_text is not None:
            try:
                weight = float(weight_text)
            except ValueError:
                raise TaskError(
                    f"{where} '{entry}': weight {weight_text!r} is not a number; "
                    f"write path:weight with a positive number, e.g. {path}:0.5"
                ) from None
            if not math.isfinite(weight) or weight <= 0:
                raise TaskError(
                    f"{where} '{entry}': weight must be a positive number, got "
                    f"{weight_text}; drop the task or give it a weight > 0, e.g. {path}:0.5"
                )
        if not path:
            raise TaskError(f"{where} '{entry}': missing path before ':'; write path[:weight]")
        abspath = path if path.startswith("hf:") else os.path.abspath(os.path.expanduser(path))
        files = _files_of(entry, abspath, where)
        n = seen.get(path, 0) + 1
        seen[path] = n
        name = path if n == 1 else f"{path}#{n}"
        parsed.append((name, abspath, weight, files))
    total = sum(w for _, _, w, _ in parsed)
    return [TaskSpec(name=n, path=p, weight=w / total, raw_weight=w, files=f) for n, p, w, f in parsed]
