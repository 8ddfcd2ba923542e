"""A setting is a dataclass field that carries its flag: names, default, help, choices and its own check.

    lr: float = setting("--lr", 1e-5, "peak learning rate", group="schedule", check=at_least(0))

The command line (config/cli.py) is derived from these fields, so a new flag is one field in config/sections.py.
A field made with `derived()` is not a flag: config/rules.py fills it in from other sections' settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A check returns what is wrong with a value ("must be >= 1"), or None when it is fine.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line."""

    names: tuple[str, ...]  # the flag, then its aliases (OpenChatKit's spellings)
    help: str | None
    group: str  # the --help section it is listed under (config.cli.GROUPS)
    choices: tuple | None = None
    switch: bool = False  # a flag without a value (store_true)
    required: bool = False
    check: Check | None = None

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def dest(self) -> str:
        """The argparse attribute (and the key of the flags that older checkpoints saved)."""
        return self.name.lstrip("-").replace("-", "_")


def setting(
    flag: str,
    default: Any = None,
    help: str | None = None,  # noqa: A002 - argparse's word
    *,
    group: str,
    choices: tuple | None = None,
    aliases: tuple[str, ...] = (),
    switch: bool = False,
    required: bool = False,
    check: Check | None = None,
) -> Any:
    """A dataclass field for the flag `flag` (see the module docstring)."""
    meta = Flag((flag, *aliases), help, group, choices, switch, required, check)
    return dataclasses.field(default=default, metadata={"flag": meta})


def derived(default: Any = None) -> Any:
    """A dataclass field that is no flag: its value comes from other sections (config/rules.py `link`)."""
    return dataclasses.field(default=default, metadata={"derived": True})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def flags_of(section_type: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of a section that are flags, in declaration order."""
    return [(f, flag_of(f)) for f in dataclasses.fields(section_type) if flag_of(f) is not None]


# ---------------------------------------------------------------------------------------------------------- values
def str_to_bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------------------- checks
def at_least(minimum: float) -> Check:
    return lambda value: None if value is None or value >= minimum else f"must be >= {minimum:g}"


def above(minimum: float) -> Check:
    return lambda value: None if value is None or value > minimum else f"must be > {minimum:g}"


def below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def not_blank(value: str | None) -> str | None:
    return None if value is None or value.strip() else "is empty; give the column name, or omit it for the default"


def problem_of(flag: Flag, value: Any) -> str | None:
    """The one-line problem of a flag's value (its own check, and finiteness for numbers), or None."""
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every `<` check
        return f"{flag.name} must be a finite number, got {value}"
    problem = flag.check(value) if flag.check is not None else None
    return f"{flag.name} {problem}, got {value}" if problem else None
