"""The settings are defined once (config/sections.py) and everything else is derived from them: the command line
users' scripts pass is unchanged, each setting lands in one section field, and a checkpoint's saved settings (today's
`config`, or the flat flags of earlier versions) read back as the same config."""

import argparse
import dataclasses
import json
import os

import pytest

import config
from config.settings import flags_of

SURFACE = os.path.join(os.path.dirname(__file__), "fixtures", "flag_surface.json")


def surface_of(parser):
    """Every flag as users see it: names, dest, default, choices, type, action, --help group."""
    out = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out[action.dest] = {
                "group": group.title,
                "flags": action.option_strings,
                "dest": action.dest,
                "default": action.default,
                "choices": list(action.choices) if action.choices else None,
                "type": getattr(action.type, "__name__", None),
                "action": type(action).__name__,
                "required": action.required,
            }
    return json.loads(json.dumps(out, default=str))


def test_the_command_line_is_the_one_users_scripts_know():
    """Flags, aliases, defaults, choices, types and groups equal the list captured before the settings moved into
    dataclass fields (help texts may improve)."""
    with open(SURFACE) as f:
        captured = {flag["dest"]: {k: v for k, v in flag.items() if k != "help"} for flag in json.load(f)}
    assert surface_of(config.build_parser()) == captured


def test_every_setting_is_one_field_of_one_section():
    """No flag is defined twice, every flag has help text, and every field is a flag or derived from others."""
    names = []
    for section_type in config.SECTIONS.values():
        for field in dataclasses.fields(section_type):
            assert "flag" in field.metadata or field.metadata.get("derived"), (section_type.__name__, field.name)
        for _, flag in flags_of(section_type):
            names += flag.names
            assert flag.help, flag.name
    assert len(names) == len(set(names))


def test_flags_land_in_their_sections_and_derived_fields_follow(tmp_path):
    job = config.parse(
        [
            "--model-name", "m", "--fp16", "--gradient-accumulate-step", "4", "--batch-size", "8",
            "--micro-batch-size", "2", "--seed", "7", "--adam-beta2", "0.95", "--checkpoint-path", str(tmp_path),
            "--num-checkpoints", "5", "--use-cuda", "false",
        ]
    )  # fmt: skip
    assert (job.model.model_dir, job.model.tokenizer_dir, job.model.dtype) == ("m", "m", "float16")
    assert (job.optimizer.fp16, job.optimizer.accumulation, job.optimizer.betas) == (True, 4, (0.9, 0.95))
    assert (job.pipeline.micro_batches, job.data.seed, job.checkpoint.keep) == (4, 7, 5)
    assert job.dist.use_cuda is False
    assert job.log.metrics_file == os.path.join(str(tmp_path), "metrics.jsonl")
    assert job.log.tensorboard_dir == os.path.join(str(tmp_path), "tensorboard")


@pytest.mark.parametrize(
    "flags,line",
    [
        (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
        (["--dp-bucket-mb", "0"], "--dp-bucket-mb must be > 0, got 0.0"),
        (["--train-warmup-steps", "3"], "--train-warmup-steps is not supported"),
        (["--train-log-backend", "print,tensorbord"], "--train-log-backend is not a list of log backends"),
    ],
)
def test_a_setting_checks_itself_in_one_line(flags, line):
    with pytest.raises(config.ArgumentError) as caught:
        config.check_settings(config.parse(["--model-name", "m", *flags]))
    assert str(caught.value).startswith(line) and "\n" not in str(caught.value)


def test_saved_settings_read_back_from_config_and_from_older_flat_flags(tmp_path):
    job = config.parse(["--model-name", "m", "--lr", "3e-4", "--optimizer", "8bit-adam", "--task-name", "a.jsonl"])
    saved = json.loads(json.dumps(config.to_dict(job)))  # as the metadata file holds it
    assert config.saved_job({"config": saved}) == job
    older = {"flags": {"model_name": "m", "lr": 3e-4, "optimizer": "8bit-adam", "task_name": "a.jsonl", "gone": 1}}
    from_flags = config.saved_job(older)
    assert (from_flags.optimizer.lr, from_flags.optimizer.kind, from_flags.data.task_spec) == (
        3e-4,
        "8bit-adam",
        "a.jsonl",
    )
    assert config.flag_values(job, [("optimizer", "lr"), ("data", "task_spec")]) == [
        ("--lr", 3e-4),
        ("--task-name", "a.jsonl"),
    ]
