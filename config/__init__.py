"""The settings of a run, each defined once (config/sections.py): the command line, the typed sections the
components take, the rules between settings, and the settings a checkpoint saved.

Reading order: settings.py (what a setting is), sections.py (every setting), rules.py (between settings),
cli.py (the command line and saved configs).
"""

from .cli import (
    add_section_flags,
    build_parser,
    check_settings,
    flag_of,
    flag_values,
    load_job,
    parse,
    saved_job,
    to_dict,
)
from .rules import ArgumentError
from .sections import (
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    JobConfig,
    LogConfig,
    LoraRunConfig,
    ModelRunConfig,
    ObjectiveConfig,
    OptimizerConfig,
    PipelineConfig,
    ProfilingConfig,
    parse_backends,
)

__all__ = [
    "SECTIONS",
    "ArgumentError",
    "CheckpointConfig",
    "DataConfig",
    "DistConfig",
    "JobConfig",
    "LogConfig",
    "LoraRunConfig",
    "ModelRunConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "ProfilingConfig",
    "add_section_flags",
    "build_parser",
    "check_settings",
    "flag_of",
    "flag_values",
    "load_job",
    "parse_backends",
    "parse",
    "saved_job",
    "to_dict",
]
