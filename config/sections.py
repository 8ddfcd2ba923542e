"""The settings of a run: one frozen dataclass per component, one field per setting (config/settings.py).

Each field is defined here once, with its flag, default, help, choices and check; the command line, `--help`, the
typed config the components take, the metadata of a checkpoint and the model card of an export all come from it.
A component takes its section and never the command line. Rules between settings of several sections, and the
`derived()` fields they fill in, live in config/rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import above, at_least, below_one, derived, not_blank, setting

PP_MODES = ("gpipe", "1f1b", "interleaved-1f1b")
OPTIMIZERS = ("adam", "adamw", "8bit-adam")
QUANTIZE_MODES = ("none", "nf4", "int8")
FP8_RECIPES = ("tensorwise", "rowwise")  # modules/fp8.py RECIPES
DATA_FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca")
LOG_BACKENDS = ("print", "loguru", "wandb", "tensorboard")
OBJECTIVES = ("sft", "dpo", "simpo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")  # trained on prompt/chosen/rejected pairs
REFERENCES = ("auto", "adapters", "stored", "copy")


def parse_backends(value: str) -> list[str]:
    """`print,tensorboard` -> ["print", "tensorboard"]; ValueError naming the unknown backend."""
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    if not names:
        raise ValueError(f"expected one or more of {', '.join(LOG_BACKENDS)} separated by commas, got {value!r}")
    for name in names:
        if name not in LOG_BACKENDS:
            raise ValueError(f"unknown backend {name!r}; use {', '.join(LOG_BACKENDS)} (combine with commas)")
    return list(dict.fromkeys(names))


def _backends_problem(value: str) -> str | None:
    try:
        parse_backends(value)
    except ValueError as exc:
        return f"is not a list of log backends: {exc}"
    return None


@dataclass(frozen=True)
class DistConfig:
    """Process groups: comm.init_distributed and the watchdog."""

    pipeline_size: int = setting("--pipeline-group-size", 1, "ranks per pipeline", group="distributed")
    data_size: int = setting("--data-group-size", 1, "pipeline replicas (data parallelism)", group="distributed")
    context_size: int = setting(
        "--context-parallel-size",
        1,
        "ranks that split every sequence between them (context parallelism; world = pp x dp x cp)",
        group="distributed",
        check=at_least(1),
    )
    dist_url: str = setting(
        "--dist-url", "tcp://127.0.0.1:7033", "rendezvous of rank 0 (without torchrun)", group="distributed"
    )
    rank: int | None = setting("--rank", None, "global rank (without torchrun)", group="distributed", check=at_least(0))
    world_size: int | None = setting(
        "--world-size", None, "ranks in all (default: pipeline x data group size)", group="distributed"
    )
    cuda_id: int | None = setting(
        "--cuda-id", None, "GPU index on this machine (default: LOCAL_RANK)", group="distributed", check=at_least(0)
    )
    use_cuda: bool = setting("--use-cuda", True, "false: train on CPU with gloo", group="distributed")
    backend: str = setting(
        "--dp-backend",
        "nccl",
        "on GPUs both move CUDA tensors with NCCL (gloo cannot); gloo adds a gloo group for CPU tensors. Without "
        "GPUs (--use-cuda false) everything runs on gloo",
        group="distributed",
        choices=("nccl", "gloo"),
    )
    net_interface: str | None = setting(
        "--net-interface", None, "sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME when unset", group="distributed"
    )
    timeout_s: float = setting(
        "--dist-timeout", 600, "seconds before a stuck collective aborts", group="distributed", check=above(0)
    )


@dataclass(frozen=True)
class ModelRunConfig:
    """The model and how it runs: modules.build_rank_stages, the stage plan, the trainer's input checks."""

    model_dir: str = setting(
        "--model-name", None, "Hugging Face model directory or layer-sharded directory", group="model", required=True
    )
    tokenizer_dir: str | None = setting(
        "--tokenizer-name", None, "tokenizer directory (default: --model-name)", group="model"
    )
    model_type: str | None = setting(
        "--model-type",
        None,
        "gptneox, gptj, llama, qwen2, qwen3, mistral, gemma2, gemma3 or phi3; checked against config.json's model_type "
        "(default: that one)",
        group="model",
    )
    layers_per_stage: int | None = setting(
        "--num-layers",
        None,
        "transformer layers per pipeline stage (default: derived from the config)",
        group="model",
        check=at_least(1),
    )
    embedding_dim: int | None = setting(
        "--embedding-dim", None, "hidden size; checked against the config", group="model"
    )
    load_pretrained: bool = setting(
        "--load-pretrained-model",
        True,
        "true: load weights from --model-name; false: random init from --seed",
        group="model",
    )
    activation_checkpointing: str = setting(
        "--activation-checkpointing",
        "none",
        "recompute blocks in backward: none, full (every block), selective (every other block)",
        group="model",
        choices=("none", "full", "selective"),
    )
    compile: bool = setting(
        "--compile", False, "torch.compile each transformer block and the loss (GPU speed)", group="model", switch=True
    )
    activation_offload: str = setting(
        "--activation-offload",
        "none",
        "cpu: keep the block inputs that activation checkpointing saves in pinned host memory, copied on a side "
        "stream (needs --activation-checkpointing)",
        group="model",
        choices=("none", "cpu"),
    )
    tiled_mlp: str = setting(
        "--tiled-mlp",
        "off",
        "on: run each block's MLP 8192 tokens at a time, each tile recomputed in the backward, so its intermediates "
        "(about 4 x the intermediate size per token) exist for one tile only; for long sequences (costs one more MLP "
        "forward)",
        group="model",
        choices=("off", "on"),
    )
    chunked_loss: str = setting(
        "--chunked-loss",
        "auto",
        "compute the LM head and the loss a few thousand tokens at a time, so the logits of the whole micro-batch "
        "never exist: on, off, auto (on where one micro-batch's fp32 logits exceed 4 GiB)",
        group="model",
        choices=("auto", "on", "off"),
    )
    attention_backend: str = setting(
        "--attention-backend",
        "auto",
        "scaled-dot-product attention kernel tried first (auto: torch's order)",
        group="model",
        choices=("auto", "flash", "cudnn", "efficient", "math"),
    )
    attention_mask: str = setting(
        "--attention-mask",
        "document",
        "document: a token sees only earlier tokens of its own packed document, positions restart per document; "
        "causal: every earlier token of the window (OpenChatKit's behaviour)",
        group="model",
        choices=("document", "causal"),
    )
    masked_attention: str = setting(
        "--masked-attention",
        "auto",
        "GPU kernel of packed documents and sliding windows: varlen (torch's varlen flash attention, each document "
        "a sequence of its own; nothing to compile; bf16/fp16 models without soft-capped scores or context "
        "parallelism) or flex (FlexAttention block masks, compiled; every model); auto: varlen where it applies, "
        "else flex",
        group="model",
        choices=("auto", "flex", "varlen"),
    )
    fp16: bool = setting(
        "--fp16", False, "fp16 model, fp32 master weights, loss scaling", group="precision", switch=True
    )
    bf16: bool = setting("--bf16", False, "bf16 model, fp32 master weights", group="precision", switch=True)
    fp8: str = setting(
        "--fp8",
        "none",
        "train the transformer blocks' large linear layers in float8 through torchao, with one scale per tensor "
        "(tensorwise, fastest) or per row (rowwise); needs --bf16 and a GPU of compute capability 8.9+",
        group="precision",
        choices=("none", *FP8_RECIPES),
    )
    seed: int = setting("--seed", 42, "random init, dropout and the data order", group="schedule")

    @property
    def dtype(self) -> str:
        """The training dtype's torch name."""
        return "float16" if self.fp16 else "bfloat16" if self.bf16 else "float32"


@dataclass(frozen=True)
class LoraRunConfig:
    """Adapters: modules.make_lora_config, modules.build_rank_stages, the checkpoint's adapter metadata."""

    r: int = setting(
        "--lora-r", 0, "LoRA rank; 0: train every weight (no adapters)", group="adapters", check=at_least(0)
    )
    alpha: float = setting(
        "--lora-alpha", 16, "LoRA scale is alpha / r (peft's rule)", group="adapters", check=above(0)
    )
    dropout: float = setting("--lora-dropout", 0.0, "dropout on the adapters' input", group="adapters", check=below_one)
    target_modules: str | None = setting(
        "--lora-target-modules",
        None,
        "comma list of HF module names, or all-linear (default: peft's for the family: query_key_value for "
        "GPT-NeoX, q_proj,v_proj for GPT-J and Llama)",
        group="adapters",
    )
    quantize_base: str = setting(
        "--quantize-base",
        "none",
        "hold the frozen base of a LoRA run in bitsandbytes 4-bit NF4 (QLoRA) or int8",
        group="adapters",
        choices=QUANTIZE_MODES,
    )
    init_dir: str | None = setting(
        "--lora-init", None, "a peft adapter directory to start the adapters from", group="adapters"
    )

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(frozen=True)
class PipelineConfig:
    """The schedule: pipeline_parallel.Pipeline and plan_stages."""

    mode: str = setting("--pp-mode", "gpipe", "pipeline schedule", group="distributed", choices=PP_MODES)
    virtual_stages: int = setting(
        "--virtual-stages", 2, "stages per rank for interleaved-1f1b", group="distributed", check=at_least(1)
    )
    micro_batches: int = derived(1)  # per iteration: --batch-size / --micro-batch-size


@dataclass(frozen=True)
class DataConfig:
    """The training and evaluation data: tasks.PackedStream, tasks.evaluation_batches, the step count."""

    task_spec: str | None = setting(
        "--task-name",
        None,
        "comma-separated source[:weight]: .jsonl/.jsonl.gz/.parquet/.arrow files, folders of them, save_to_disk "
        "folders, hf:ORG/NAME[@split][#config]",
        group="data",
    )
    seq_length: int = setting("--seq-length", 2048, "tokens per packed window", group="data", check=at_least(1))
    batch_size: int = setting(
        "--batch-size",
        4,
        "sequences (pairs under preference objectives) per data-parallel replica per iteration",
        group="data",
        check=at_least(1),
    )
    micro_batch_size: int = setting(
        "--micro-batch-size", 1, "sequences (pairs) per pipeline micro-batch", group="data", check=at_least(1)
    )
    accumulation: int = setting(
        "--gradient-accumulate-step", 1, "iterations per optimizer step", group="data", check=at_least(1)
    )
    train_on_inputs: bool = setting(
        "--train-on-inputs", False, "chat records: also train on user turns", group="data", switch=True
    )
    loss_on_bot_only: bool = setting(
        "--loss-on-bot-only", False, "OIG text records: loss on <bot> turns only", group="data", switch=True
    )
    shuffle_buffer: int = setting(
        "--shuffle-buffer", 1000, "records held per task for shuffling", group="data", check=at_least(1)
    )
    workers: int = setting(
        "--data-workers",
        1,
        "background tokenisation workers (0: on the training thread)",
        group="data",
        check=at_least(0),
    )
    cache_dir: str | None = setting(
        "--data-cache",
        None,
        "tokenize --task-name once into this token cache folder before training, or reuse the one there "
        "(tools/prepare_data.py's format); a restart then reads it instead of tokenizing again",
        group="data",
    )
    evaluation_data: str | None = setting("--evaluation-data", None, "comma-separated eval .jsonl files", group="data")
    evaluation_every: int = setting(
        "--evaluation-steps", 0, "evaluate every N optimizer steps (0: never)", group="data", check=at_least(0)
    )
    evaluation_batches: int | None = setting(
        "--evaluation-num-batch", None, "max eval batches (default: all)", group="data", check=at_least(1)
    )
    data_format: str = setting(
        "--data-format",
        "auto",
        "record layout: auto (detected per record), text (OIG), messages, sharegpt (conversations), alpaca",
        group="data",
        choices=DATA_FORMATS,
    )
    text_field: str | None = setting(
        "--text-field", None, "column holding the text of text records (default: text)", group="data", check=not_blank
    )
    messages_field: str | None = setting(
        "--messages-field",
        None,
        "column holding the turns of messages / ShareGPT records (default: messages / conversations)",
        group="data",
        check=not_blank,
    )
    total_iterations: int | None = setting(
        "--total-steps", None, "iterations including gradient-accumulation steps", group="schedule", check=at_least(1)
    )
    epochs: int | None = setting(
        "--nepochs", None, "derive --total-steps from the token count", group="schedule", check=at_least(1)
    )
    seed: int = derived(42)  # --seed: the shuffle and the mixture's choices


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loss learns: training.loss (sft) or training.preference (pairs), and DPO's reference model."""

    kind: str = setting(
        "--objective",
        "sft",
        "sft: next-token loss on the data's loss spans; dpo, simpo, orpo: preference tuning on prompt / chosen / "
        "rejected records (--batch-size and --micro-batch-size then count pairs)",
        group="objective",
        choices=OBJECTIVES,
    )
    dpo_beta: float = setting(
        "--dpo-beta",
        0.1,
        "DPO: beta, how far the policy may move from the reference",
        group="objective",
        check=above(0),
    )
    dpo_label_smoothing: float = setting(
        "--dpo-label-smoothing",
        0.0,
        "DPO: the share of pairs assumed mislabelled (conservative DPO), below 0.5",
        group="objective",
        check=at_least(0),
    )
    dpo_reference: str = setting(
        "--dpo-reference",
        "auto",
        "DPO's reference model: adapters (the base with the LoRA adapters off: no memory), stored (log-probabilities "
        "of the starting weights, computed before step 1 and kept beside the checkpoints), copy (a frozen copy of "
        "the starting weights), auto (adapters under --lora-r, else stored)",
        group="objective",
        choices=REFERENCES,
    )
    simpo_beta: float = setting(
        "--simpo-beta", 2.0, "SimPO: beta, the scale of the length-normalised reward", group="objective", check=above(0)
    )
    simpo_gamma: float = setting(
        "--simpo-gamma", 0.5, "SimPO: the target reward margin gamma", group="objective", check=at_least(0)
    )
    orpo_lambda: float = setting(
        "--orpo-lambda",
        0.1,
        "ORPO: weight of the odds-ratio term beside the chosen SFT loss",
        group="objective",
        check=above(0),
    )
    pack_pairs: bool = setting(
        "--pack-pairs",
        True,
        "pairs at pp=1 without context parallelism: true packs a micro-batch's sequences one after another into one "
        "row, as documents that do not see each other; false pads them to the micro-batch's longest (at pp > 1 rows "
        "are always padded to --seq-length)",
        group="objective",
    )

    @property
    def preference(self) -> bool:
        """Trained on pairs (every objective but sft)."""
        return self.kind in PREFERENCE_OBJECTIVES


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer step: optimizer.StageOptimizer and its data_parallel.GradientReducer."""

    kind: str = setting("--optimizer", "adam", "adam and adamw are both AdamW", group="optimizer", choices=OPTIMIZERS)
    lr: float = setting("--lr", 1e-5, "peak learning rate", group="schedule", check=at_least(0))
    lr_scheduler: str = setting(
        "--lr-scheduler",
        "linear",
        "after the warmup: linear or cosine decay to 0 at the last step, or constant",
        group="schedule",
        choices=("linear", "cosine", "constant"),
    )
    warmup_iterations: int = setting(
        "--warmup-steps", 0, "linear warmup, counted like --total-steps", group="schedule", check=at_least(0)
    )
    train_warmup_steps: int = setting(
        "--train-warmup-steps",
        0,
        "OpenChatKit flag; only 0 is supported",
        group="schedule",
        check=lambda value: None if value == 0 else "is not supported (OpenChatKit ignored it); pass 0 or drop it",
    )
    weight_decay: float = setting(
        "--weight-decay", 0.01, "AdamW weight decay (none on biases and norms)", group="optimizer", check=at_least(0)
    )
    adam_beta1: float = setting("--adam-beta1", 0.9, "AdamW beta1", group="optimizer", check=below_one)
    adam_beta2: float = setting("--adam-beta2", 0.999, "AdamW beta2", group="optimizer", check=below_one)
    eps: float = setting("--adam-eps", 1e-6, "AdamW epsilon", group="optimizer", check=above(0))
    max_grad_norm: float = setting(
        "--max-grad-norm", 1.0, "global clipping norm (0: off)", group="optimizer", check=at_least(0)
    )
    offload: str = setting(
        "--offload-optimizer",
        "none",
        "cpu: fp32 master weights and AdamW state in host memory, the optimizer step on the CPU",
        group="optimizer",
        choices=("none", "cpu"),
    )
    loss_scale: float = setting(
        "--loss-scale", 0, "> 0: static loss scale; 0: dynamic", group="precision", check=at_least(0)
    )
    initial_loss_scale: float = setting(
        "--initial-loss-scale", 2**15, "first dynamic loss scale (--fp16)", group="precision", check=above(0)
    )
    loss_scale_window: int = setting(
        "--loss-scale-window",
        1000,
        "steps without overflow before the scale doubles",
        group="precision",
        check=at_least(1),
    )
    hysteresis: int = setting(
        "--hysteresis", 2, "overflows tolerated before the scale halves", group="precision", check=at_least(1)
    )
    min_loss_scale: float = setting(
        "--min-loss-scale", 1, "the dynamic loss scale never goes below this", group="precision", check=above(0)
    )
    dp_mode: str = setting(
        "--dp-mode",
        "allreduce",
        "sharded: each data-parallel rank keeps 1/dp of every stage's fp32 master weights and optimizer state "
        "(gradients reduce-scattered, weights all-gathered)",
        group="distributed",
        choices=("allreduce", "sharded"),
    )
    dp_bucket_mb: float = setting(
        "--dp-bucket-mb",
        64,
        "size of the gradient buckets reduced over the data-parallel group while the backward runs: smaller "
        "starts the first reduction sooner, larger launches fewer collectives",
        group="distributed",
        check=above(0),
    )
    accumulation: int = derived(1)  # --gradient-accumulate-step: turns warmup iterations into optimizer steps
    fp16: bool = derived(False)  # --fp16: loss scaling

    @property
    def betas(self) -> tuple[float, float]:
        return (self.adam_beta1, self.adam_beta2)


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and resuming: checkpoint.TrainingCheckpoint."""

    path: str = setting(
        "--checkpoint-path", "./model_ckpts/run", "folder of this run's checkpoints", group="checkpoints"
    )
    every_steps: int = setting(
        "--checkpoint-steps",
        0,
        "save every N optimizer steps (0: end only; see --defer-checkpoints)",
        group="checkpoints",
        check=at_least(0),
    )
    resume: bool = setting("--load-checkpoint", True, "resume from <checkpoint-path>/latest", group="checkpoints")
    fallback: bool = setting(
        "--resume-fallback",
        False,
        "if the latest checkpoint is damaged, resume from the newest complete earlier one",
        group="checkpoints",
        switch=True,
    )
    resume_data: str = setting(
        "--resume-data",
        "exact",
        "data stream on resume: exact (refuse changed data files or data flags), continue (go on at the saved "
        "position in data files that changed size; not an exact resume), restart (read the data from the start; "
        "weights, optimizer and LR schedule still resume)",
        group="checkpoints",
        choices=("exact", "continue", "restart"),
    )
    keep: int = setting(
        "--keep-checkpoints",
        3,
        "checkpoints kept on disk (0: keep all)",
        group="checkpoints",
        aliases=("--num-checkpoints",),
        check=at_least(0),
    )
    async_write: bool = setting(
        "--async-checkpoint",
        True,
        "true: copy the state to host memory and write the checkpoint in a background thread while training goes "
        "on (host memory for one checkpoint per host); false: training waits for the whole write",
        group="checkpoints",
    )
    defer: bool = setting(
        "--defer-checkpoints",
        True,
        "with --async-checkpoint true, a periodic save that falls due while the previous checkpoint is still being "
        "written: true: taken after the first step that finds that write done (training never waits for a write; "
        "its step may pass the multiple of --checkpoint-steps); false: it waits for the write and keeps its step",
        group="checkpoints",
    )


@dataclass(frozen=True)
class LogConfig:
    """Logs and metrics: utils.logging.make_logger and the trainer's cadence."""

    backend: str = setting(
        "--train-log-backend",
        "print",
        "print | loguru | wandb | tensorboard, or several joined by commas (print,tensorboard)",
        group="logging",
        check=_backends_problem,
    )
    tensorboard_dir: str | None = setting(
        "--tensorboard-dir", None, "tensorboard event files (default: <checkpoint-path>/tensorboard)", group="logging"
    )
    project: str = setting("--project-name", "openchatkit-finetune", "wandb project", group="logging")
    job_id: str = setting("--job-id", "0", "name of this job in logs and wandb", group="logging")
    every_steps: int = setting("--log-interval", 1, "log every N optimizer steps", group="logging", check=at_least(1))
    metrics_file: str | None = setting(
        "--metrics-file",
        None,
        "also append each step's metrics as JSON lines here (default: <checkpoint-path>/metrics.jsonl)",
        group="logging",
    )
    curves_file: str | None = (
        derived()
    )  # the metrics drawn at each checkpoint and at the end: <checkpoint-path>/curves.png


@dataclass(frozen=True)
class ProfilingConfig:
    """Traces: training.profiling.make_profiler."""

    mode: str = setting(
        "--profiling",
        "no-profiling",
        "tidy_profiling: a Chrome trace of the pipeline's lanes; pytorch_profiling: torch.profiler's; "
        "memory_profiling: the GPU allocator's history per rank, for https://pytorch.org/memory_viz",
        group="logging",
        choices=("no-profiling", "tidy_profiling", "pytorch_profiling", "memory_profiling"),
    )
    directory: str = setting("--profiling-dir", "./profiles", "where traces are written", group="logging")
    steps: int = setting(
        "--profiling-steps", 3, "optimizer steps traced when profiling", group="logging", check=at_least(1)
    )


@dataclass(frozen=True)
class JobConfig:
    """Every section of a run. `config.load_job` builds it from the command line, `config.saved_job` from a
    checkpoint's metadata."""

    dist: DistConfig = DistConfig()
    model: ModelRunConfig = ModelRunConfig()
    lora: LoraRunConfig = LoraRunConfig()
    pipeline: PipelineConfig = PipelineConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    profiling: ProfilingConfig = ProfilingConfig()


# The sections by their JobConfig attribute, in order.
SECTIONS: dict[str, type] = {
    "dist": DistConfig,
    "model": ModelRunConfig,
    "lora": LoraRunConfig,
    "pipeline": PipelineConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "profiling": ProfilingConfig,
}
