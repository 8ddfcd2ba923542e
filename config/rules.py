"""Rules between settings, in one place: the `derived()` fields and defaults that follow from other settings
(`link`), and the combinations that cannot work (`check`), each refused in one line that names the flags and the fix.

A setting's own range (`--lr` >= 0) is its field's check in config/sections.py; what is here involves several.
Nothing here needs torch, a model, data or a process group: the checks run before any of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket

from utils.errors import UserError

from .sections import PREFERENCE_OBJECTIVES, JobConfig, ObjectiveConfig, parse_backends

# One of these must be in --tokenizer-name: transformers 5 otherwise builds an empty tokenizer without a word.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# The field settings that each --data-format reads (tasks.render.RecordFormat)
FIELDS_READ = {
    "auto": ("--text-field", "--messages-field"),
    "text": ("--text-field",),
    "messages": ("--messages-field",),
    "sharegpt": ("--messages-field",),
    "alpaca": (),
}


class ArgumentError(UserError, ValueError):
    """Settings that cannot work; the message names the flag and the fix."""


def link(job: JobConfig) -> JobConfig:
    """Fill in what follows from other settings: the derived fields and the defaults that name another setting."""
    replace = dataclasses.replace
    data, log, path = job.data, job.log, job.checkpoint.path
    return replace(
        job,
        model=replace(job.model, tokenizer_dir=job.model.tokenizer_dir or job.model.model_dir),
        pipeline=replace(job.pipeline, micro_batches=max(1, data.batch_size // max(1, data.micro_batch_size))),
        data=replace(data, seed=job.model.seed),
        optimizer=replace(job.optimizer, accumulation=data.accumulation, fp16=job.model.fp16),
        log=replace(
            log,
            metrics_file=log.metrics_file or os.path.join(path, "metrics.jsonl"),
            tensorboard_dir=log.tensorboard_dir or os.path.join(path, "tensorboard"),
            curves_file=os.path.join(path, "curves.png"),
        ),
    )


def check(job: JobConfig) -> None:
    """Raise ArgumentError for the first combination of settings that cannot work."""
    _check_layout(job)
    _check_schedule(job)
    _check_precision(job)
    _check_lora(job)
    _check_objective(job)
    _check_data_format(job)
    _check_dist(job)
    _check_inputs_exist(job)
    _check_log(job)


def _check_layout(job: JobConfig) -> None:
    data, dist, mode = job.data, job.dist, job.pipeline.mode
    if data.batch_size % data.micro_batch_size:
        raise ArgumentError(
            f"--batch-size {data.batch_size} must be a multiple of --micro-batch-size {data.micro_batch_size}"
        )
    pp, n_micro = dist.pipeline_size, job.pipeline.micro_batches
    if mode == "interleaved-1f1b":
        if job.pipeline.virtual_stages < 2:
            raise ArgumentError("--pp-mode interleaved-1f1b needs --virtual-stages >= 2")
        if pp < 2:
            raise ArgumentError("--pp-mode interleaved-1f1b needs --pipeline-group-size >= 2; use gpipe or 1f1b")
        if n_micro % pp:
            raise ArgumentError(
                f"--pp-mode interleaved-1f1b needs the micro-batch count (--batch-size / "
                f"--micro-batch-size = {n_micro}) to be a multiple of --pipeline-group-size {pp}"
            )
    if mode == "1f1b" and pp > 1 and n_micro < pp:
        raise ArgumentError(
            f"--pp-mode 1f1b needs at least --pipeline-group-size ({pp}) micro-batches per "
            f"iteration, got {n_micro}; raise --batch-size or lower --micro-batch-size"
        )
    cp = dist.context_size
    expected_world = pp * dist.data_size * cp
    if dist.world_size is not None and dist.world_size != expected_world:
        sizes = "--pipeline-group-size x --data-group-size" + (" x --context-parallel-size" if cp > 1 else "")
        raise ArgumentError(f"--world-size {dist.world_size} must equal {sizes} = {expected_world}")
    if cp > 1 and data.seq_length % (2 * cp):
        raise ArgumentError(
            f"--context-parallel-size {cp} cuts each sequence into {2 * cp} equal chunks (two per rank): "
            f"--seq-length {data.seq_length} must be a multiple of {2 * cp}"
        )
    if data.cache_dir and (job.objective.preference or data.epochs is not None):
        reason = (
            f"--objective {job.objective.kind} reads pairs" if job.objective.preference else "--nepochs counts passes"
        )
        raise ArgumentError(f"--data-cache keeps SFT token windows for --total-steps; {reason}: drop --data-cache")


def _check_schedule(job: JobConfig) -> None:
    data = job.data
    if (data.total_iterations is None) == (data.epochs is None):
        raise ArgumentError("give --total-steps N or --nepochs N (one of them)")
    if data.total_iterations is not None and data.total_iterations % data.accumulation:
        raise ArgumentError(
            f"--total-steps {data.total_iterations} counts iterations including accumulation; it must be "
            f"a multiple of --gradient-accumulate-step {data.accumulation}"
        )
    if data.evaluation_every and not data.evaluation_data:
        raise ArgumentError("--evaluation-steps needs --evaluation-data FILE[,FILE]")
    if not data.task_spec:
        raise ArgumentError(
            "--task-name is required: comma-separated source[:weight] (.jsonl, .parquet or .arrow files, folders, "
            "hf:ORG/NAME)"
        )


def _check_precision(job: JobConfig) -> None:
    model, opt = job.model, job.optimizer
    if model.fp16 and model.bf16:
        raise ArgumentError("--fp16 and --bf16 exclude each other; pick one")
    if model.activation_offload != "none" and model.activation_checkpointing == "none":
        raise ArgumentError(
            "--activation-offload cpu moves the block inputs that activation checkpointing keeps, and this run "
            "checkpoints none; add --activation-checkpointing full (or selective)"
        )
    if opt.kind == "8bit-adam" and opt.offload != "none":
        raise ArgumentError(
            "--offload-optimizer cpu steps torch's AdamW on the host and 8-bit Adam (bitsandbytes) runs on the GPU; "
            "use --optimizer adamw with --offload-optimizer cpu, or drop --offload-optimizer"
        )
    if model.fp8 == "none":
        return
    flag = f"--fp8 {model.fp8}"
    if not job.dist.use_cuda:  # modules/fp8.py checks the GPU itself once the process has one
        raise ArgumentError(
            "--fp8 needs an NVIDIA GPU with compute capability 8.9+ (H100/L4/RTX 4090); this run has "
            "--use-cuda false (CPU); drop --fp8"
        )
    if model.fp16 or not model.bf16:
        raise ArgumentError(
            f"{flag} trains a bf16 model (float8 matmuls, bf16 weights, fp32 master weights): "
            f"{'replace --fp16 with' if model.fp16 else 'add'} --bf16"
        )
    if job.lora.enabled:
        raise ArgumentError(
            f"{flag} and LoRA adapters (--lora-r, --quantize-base) are not supported together; drop one of them"
        )
    if (job.data.micro_batch_size * job.data.seq_length) % 16:
        raise ArgumentError(
            f"{flag} needs --micro-batch-size x --seq-length to be a multiple of 16 (the tokens of a float8 "
            f"matmul), got {job.data.micro_batch_size} x {job.data.seq_length}; use a --seq-length that is a "
            f"multiple of 16"
        )
    if importlib.util.find_spec("torchao") is None:  # without importing it: torchao takes seconds to import
        raise ArgumentError(f"{flag}: float8 training needs torchao: pip install torchao")


def _check_lora(job: JobConfig) -> None:
    lora = job.lora
    if not lora.enabled:
        for flag, given in (
            ("--quantize-base", lora.quantize_base != "none"),
            ("--lora-init", lora.init_dir is not None),
            ("--lora-target-modules", lora.target_modules is not None),
        ):
            if given:
                raise ArgumentError(f"{flag} needs adapters: add --lora-r R (16 is a common rank)")
        return
    if lora.init_dir is not None and not os.path.isfile(os.path.join(lora.init_dir, "adapter_config.json")):
        raise ArgumentError(
            f"--lora-init {lora.init_dir}: no adapter_config.json there; give a peft adapter directory "
            f"(what PeftModel.save_pretrained or tools/convert_to_hf.py writes)"
        )


# The settings each objective reads; given to another one they would be ignored, so they are refused.
_OBJECTIVE_FLAGS = {
    "dpo_beta": ("--dpo-beta", ("dpo",)),
    "dpo_label_smoothing": ("--dpo-label-smoothing", ("dpo",)),
    "dpo_reference": ("--dpo-reference", ("dpo",)),
    "simpo_beta": ("--simpo-beta", ("simpo",)),
    "simpo_gamma": ("--simpo-gamma", ("simpo",)),
    "orpo_lambda": ("--orpo-lambda", ("orpo",)),
    "pack_pairs": ("--pack-pairs", PREFERENCE_OBJECTIVES),
}


def _check_objective(job: JobConfig) -> None:
    objective, defaults = job.objective, ObjectiveConfig()
    for field, (flag, readers) in _OBJECTIVE_FLAGS.items():
        if objective.kind not in readers and getattr(objective, field) != getattr(defaults, field):
            raise ArgumentError(
                f"{flag} is a setting of --objective {' / '.join(readers)}, not of --objective {objective.kind}; "
                f"drop it or change --objective"
            )
    if objective.dpo_label_smoothing >= 0.5:
        raise ArgumentError(
            f"--dpo-label-smoothing {objective.dpo_label_smoothing}: must be below 0.5 (at 0.5 chosen and rejected "
            f"are taken as equally likely and nothing is learned)"
        )
    if objective.dpo_reference == "adapters" and not job.lora.enabled:
        raise ArgumentError(
            "--dpo-reference adapters needs LoRA adapters to switch off: add --lora-r R, or use --dpo-reference copy"
        )
    if objective.preference:
        for flag, given in (
            ("--train-on-inputs", job.data.train_on_inputs),
            ("--loss-on-bot-only", job.data.loss_on_bot_only),
        ):
            if given:
                raise ArgumentError(
                    f"{flag} does not apply to --objective {objective.kind}: its loss is on the chosen and rejected "
                    f"completions; drop {flag}"
                )


def _check_data_format(job: JobConfig) -> None:
    data = job.data
    read = FIELDS_READ[data.data_format]
    for flag, value in (("--text-field", data.text_field), ("--messages-field", data.messages_field)):
        if value is not None and flag not in read:
            raise ArgumentError(
                f"{flag} {value} has no effect with --data-format {data.data_format} (it reads "
                f"{', '.join(read) or 'fixed columns'}); drop it or use --data-format auto"
            )


def _check_dist(job: JobConfig) -> None:
    dist = job.dist
    if dist.dist_url and not dist.dist_url.startswith(("tcp://", "env://", "file://")):
        raise ArgumentError(f"--dist-url {dist.dist_url}: expected tcp://HOST:PORT (the address of rank 0)")
    if dist.net_interface:
        try:
            names = {name for _, name in socket.if_nameindex()}
        except OSError:  # no interface list on this system: let the process group find out
            names = {dist.net_interface}
        if dist.net_interface not in names:
            raise ArgumentError(
                f"--net-interface {dist.net_interface}: no such network interface here (this "
                f"machine has {', '.join(sorted(names))})"
            )


def _check_inputs_exist(job: JobConfig) -> None:
    model = job.model
    if not os.path.isdir(model.model_dir):
        raise ArgumentError(
            f"--model-name {model.model_dir}: no such directory (hub names cannot be downloaded "
            f"here; pass a local Hugging Face or layer-sharded directory)"
        )
    if not os.path.isfile(os.path.join(model.model_dir, "config.json")):
        raise ArgumentError(f"--model-name {model.model_dir}: no config.json in it")
    tokenizer = model.tokenizer_dir
    if not os.path.isdir(tokenizer):
        raise ArgumentError(f"--tokenizer-name {tokenizer}: no such directory")
    if not any(os.path.isfile(os.path.join(tokenizer, name)) for name in TOKENIZER_FILES):
        raise ArgumentError(
            f"--tokenizer-name {tokenizer}: no tokenizer files in it (one of "
            f"{', '.join(TOKENIZER_FILES)}); point it at the model's tokenizer"
        )


def _check_log(job: JobConfig) -> None:
    """The log backends and profilers, and that every folder a run writes can be made and written."""
    log = job.log
    writable_dir("--checkpoint-path", job.checkpoint.path)
    if log.metrics_file != os.path.join(job.checkpoint.path, "metrics.jsonl"):  # given by --metrics-file
        writable_dir("--metrics-file", os.path.dirname(os.path.abspath(log.metrics_file)), "file path")
        if os.path.isdir(log.metrics_file):
            raise ArgumentError(f"--metrics-file {log.metrics_file} is a directory; give a file path")
    if job.profiling.mode == "memory_profiling" and not job.dist.use_cuda:
        raise ArgumentError(
            "--profiling memory_profiling records the GPU allocator's history, and this run has --use-cuda false "
            "(CPU); run it on a GPU, or pick tidy_profiling or pytorch_profiling"
        )
    if job.profiling.mode != "no-profiling":
        writable_dir("--profiling-dir", job.profiling.directory)
    if "tensorboard" in parse_backends(log.backend):
        writable_dir("--tensorboard-dir", log.tensorboard_dir)


def writable_dir(flag: str, path: str, what: str = "directory") -> None:
    """A directory that is there or can be made and written: the nearest existing ancestor decides."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArgumentError(f"{flag} {path}: {probe} is not a directory; give a {what} that can be created")
    if not os.access(probe, os.W_OK):
        raise ArgumentError(f"{flag} {path}: {probe} is not writable; give a {what} you can write")
