"""The command line, derived from the settings of config/sections.py, and the way back from a saved config.

job = load_job(argv)              # parse, check each setting, link the sections, check the rules
parser = build_parser()           # for --help, and for the launcher's own flags
saved = to_dict(job)              # {section: {field: value}}: checkpoint metadata, wandb, tensorboard
job = saved_job(meta)             # a checkpoint's settings, also from the flat flags older versions saved
rows = flag_values(job, [...])    # (flag, value) pairs, e.g. for an export's model card
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from . import rules
from .sections import SECTIONS, JobConfig
from .settings import Flag, flags_of, problem_of, str_to_bool

# The --help sections, in order, and their titles.
GROUPS = {
    "model": "model",
    "adapters": "adapters (LoRA / QLoRA)",
    "data": "data",
    "objective": "objective (SFT or preference tuning)",
    "schedule": "schedule",
    "optimizer": "optimizer",
    "precision": "precision",
    "distributed": "distributed",
    "checkpoints": "checkpoints",
    "logging": "logging",
}
PROG = "dist_lm_pretrain_and_finetune.py"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line instead of the full usage block (this command has ~80 flags), raised as the settings' own
        problems are: the entrypoint prints it, exits 2, and under torchrun records it for the failure report."""
        raise rules.ArgumentError(f"{message} (see --help)")


def _value_type(section_type: type, field: dataclasses.Field) -> type:
    """The field's type without `| None`: int, float, str or bool."""
    hint = typing.get_type_hints(section_type)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Pipeline x data-parallel fine-tuning of causal LMs (Qwen, Llama, Mistral, Gemma, Phi, GPT-NeoX, GPT-J).",
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    settings = [
        (section_type, field, flag) for section_type in SECTIONS.values() for field, flag in flags_of(section_type)
    ]
    order = list(GROUPS)
    for section_type, field, flag in sorted(settings, key=lambda s: order.index(s[2].group)):  # usage: by --help group
        _add_flag(groups[flag.group], section_type, field, flag)
    return parser


def add_section_flags(parser, section_type: type, names: list[str]) -> None:
    """The flags of fields `names` of a section, as the trainer takes them: for tools that read some settings
    (tools/prepare_data.py: the data settings). Values land under the field names."""
    for field, flag in flags_of(section_type):
        if field.name in names:
            _add_flag(parser, section_type, field, dataclasses.replace(flag, required=False), dest=field.name)


def _add_flag(group, section_type: type, field: dataclasses.Field, flag: Flag, dest: str | None = None) -> None:
    options: dict[str, Any] = {"dest": dest or flag.dest, "default": field.default, "help": flag.help}
    if flag.switch:
        options["action"] = "store_true"
    else:
        value_type = _value_type(section_type, field)
        if value_type is bool:
            options["type"] = str_to_bool  # `--use-cuda false`: OpenChatKit's scripts pass a value
        elif value_type in (int, float):
            options["type"] = value_type
        if flag.choices:
            options["choices"] = flag.choices
        if flag.required:
            options["required"] = True
    group.add_argument(*flag.names, **options)


def job_from_values(values: dict[str, Any]) -> JobConfig:
    """The sections from flag values keyed by argparse dest (missing ones take their default); not yet linked."""
    sections = {}
    for name, section_type in SECTIONS.items():
        given = {f.name: values[flag.dest] for f, flag in flags_of(section_type) if flag.dest in values}
        sections[name] = section_type(**given)
    return JobConfig(**sections)


def check_settings(job: JobConfig) -> None:
    """Each setting's own check (config/sections.py), in --help order of its section."""
    for name, section_type in SECTIONS.items():
        section = getattr(job, name)
        for field, flag in flags_of(section_type):
            problem = problem_of(flag, getattr(section, field.name))
            if problem:
                raise rules.ArgumentError(problem)


def parse(argv: list[str] | None = None) -> JobConfig:
    """The command line as sections, linked but not checked (ArgumentError for an unknown flag or a bad value)."""
    namespace = build_parser().parse_args(argv)
    return rules.link(job_from_values(vars(namespace)))


def load_job(argv: list[str] | None = None) -> JobConfig:
    """The checked, linked config of the command line; ArgumentError names the first problem."""
    job = parse(argv)
    check_settings(job)
    rules.check(job)
    return job


# ---------------------------------------------------------------------------------------------------------- saved
def to_dict(job: JobConfig) -> dict[str, dict[str, Any]]:
    """{section: {field: value}}, JSON-safe: what a checkpoint's metadata and the log backends record."""
    return {name: dataclasses.asdict(getattr(job, name)) for name in SECTIONS}


def saved_job(meta: dict) -> JobConfig:
    """The settings a checkpoint was trained with: its `config`, or the flat `flags` (argparse names) that
    checkpoints of earlier versions saved. Unknown keys are ignored and missing ones take today's defaults."""
    if "config" in meta:
        sections = {}
        for name, section_type in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(section_type)}
            saved = meta["config"].get(name, {})
            sections[name] = section_type(**{k: v for k, v in saved.items() if k in known})
        return JobConfig(**sections)
    return rules.link(job_from_values(meta.get("flags", {})))


def flag_of(section: str, field: str) -> Flag:
    """The flag of one setting, e.g. flag_of("optimizer", "lr").name == "--lr"."""
    for f, flag in flags_of(SECTIONS[section]):
        if f.name == field:
            return flag
    raise KeyError(f"{section}.{field} is not a flag")


def flag_values(job: JobConfig, settings: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """(flag, value) of the (section, field) settings, for people to read."""
    return [(flag_of(section, field).name, getattr(getattr(job, section), field)) for section, field in settings]
