"""Typed configuration: one section per component, built from the command line by `utils.args.job_config`.

Components take their section, never the argparse namespace; flag names appear only in utils/args.py and in the
messages users read. Every field says what it means; the flag it comes from is in brackets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistConfig:
    pipeline_size: int  # ranks per pipeline [--pipeline-group-size]
    data_size: int  # pipeline replicas [--data-group-size]
    dist_url: str  # rank 0's address when not under torchrun [--dist-url]
    rank: int | None  # global rank when not under torchrun [--rank]
    world_size: int | None  # [--world-size]; None: pipeline_size x data_size
    cuda_id: int | None  # GPU of this process; None: LOCAL_RANK [--cuda-id]
    use_cuda: bool  # False: CPU and gloo only [--use-cuda]
    backend: str  # nccl, or gloo (adds a gloo group for CPU tensors) [--dp-backend]
    net_interface: str | None  # sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when unset [--net-interface]
    timeout_s: float  # a stuck collective or a silent rank ends the job after this long [--dist-timeout]


@dataclass(frozen=True)
class ModelRunConfig:
    model_dir: str  # HF or layer-sharded directory [--model-name]
    tokenizer_dir: str  # [--tokenizer-name]
    model_type: str | None  # gptneox | gptj | llama; None: config.json's [--model-type]
    layers_per_stage: int | None  # OpenChatKit's --num-layers; None: balanced split [--num-layers]
    embedding_dim: int | None  # checked against the config's hidden size [--embedding-dim]
    load_pretrained: bool  # False: random init from `seed` [--load-pretrained-model]
    activation_checkpointing: str  # none | full | selective [--activation-checkpointing]
    compile: bool  # torch.compile each block and the loss [--compile]
    attention_backend: str  # SDPA kernel tried first [--attention-backend]
    attention_mask: str  # document: packed documents do not see each other; causal: the whole window [--attention-mask]
    dtype: str  # float32 | bfloat16 | float16 [--bf16 / --fp16]
    seed: int  # random init and data order [--seed]
    fp8: str = "none"  # none | tensorwise | rowwise: the blocks' large linears in torchao float8 [--fp8]


@dataclass(frozen=True)
class LoraRunConfig:
    r: int  # adapter rank; 0: dense training, no adapters [--lora-r]
    alpha: float  # the adapters' output is scaled by alpha / r [--lora-alpha]
    dropout: float  # on the adapters' input [--lora-dropout]
    target_modules: str | None  # comma list of HF module names or all-linear; None: the family's default
    quantize_base: str  # none | nf4 | int8: the frozen base through bitsandbytes [--quantize-base]
    init_dir: str | None  # a peft adapter directory to start from [--lora-init]

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(frozen=True)
class PipelineConfig:
    mode: str  # gpipe | 1f1b | interleaved-1f1b [--pp-mode]
    virtual_stages: int  # stages per rank under interleaved-1f1b [--virtual-stages]
    micro_batches: int  # per iteration [--batch-size / --micro-batch-size]


@dataclass(frozen=True)
class DataConfig:
    task_spec: str  # path[:weight],... [--task-name]
    seq_length: int  # [--seq-length]
    batch_size: int  # sequences per replica per iteration [--batch-size]
    accumulation: int  # iterations per optimizer step [--gradient-accumulate-step]
    train_on_inputs: bool  # [--train-on-inputs]
    loss_on_bot_only: bool  # [--loss-on-bot-only]
    shuffle_buffer: int  # [--shuffle-buffer]
    workers: int  # [--data-workers]
    data_format: str  # auto | text | messages | sharegpt | alpaca [--data-format]
    text_field: str | None  # column holding OIG text [--text-field]
    messages_field: str | None  # column holding chat turns [--messages-field]
    seed: int  # [--seed]
    evaluation_data: str | None  # [--evaluation-data]
    evaluation_every: int  # optimizer steps; 0 never [--evaluation-steps]
    evaluation_batches: int | None  # None: all [--evaluation-num-batch]
    total_iterations: int | None  # iterations including accumulation [--total-steps]
    epochs: int | None  # derive the length from the token count [--nepochs]


@dataclass(frozen=True)
class OptimizerConfig:
    kind: str  # adam | adamw | 8bit-adam [--optimizer]
    lr: float  # [--lr]
    lr_scheduler: str  # linear | cosine | constant [--lr-scheduler]
    warmup_iterations: int  # counted like --total-steps [--warmup-steps]
    accumulation: int  # iterations per optimizer step, to turn warmup into optimizer steps
    weight_decay: float  # [--weight-decay]
    betas: tuple[float, float]  # [--adam-beta1 / --adam-beta2]
    eps: float  # [--adam-eps]
    max_grad_norm: float  # global clipping; 0 off [--max-grad-norm]
    fp16: bool  # dynamic (or static) loss scaling [--fp16]
    loss_scale: float  # > 0 static, 0 dynamic [--loss-scale]
    initial_loss_scale: float  # [--initial-loss-scale]
    loss_scale_window: int  # [--loss-scale-window]
    hysteresis: int  # [--hysteresis]
    min_loss_scale: float  # [--min-loss-scale]
    dp_mode: str = "allreduce"  # allreduce: every replica keeps all state; sharded: 1/dp of it per rank [--dp-mode]
    dp_bucket_mb: float = 64  # gradients are reduced in buckets of this size during the backward [--dp-bucket-mb]
    offload: str = (
        "none"  # none | cpu: fp32 masters and optimizer state on the host, stepped there [--offload-optimizer]
    )


@dataclass(frozen=True)
class CheckpointConfig:
    path: str  # [--checkpoint-path]
    every_steps: int  # optimizer steps; 0: at the end only [--checkpoint-steps]
    resume: bool  # [--load-checkpoint]
    fallback: bool  # resume from an earlier complete checkpoint when `latest` is damaged [--resume-fallback]
    resume_data: str  # exact | continue | restart [--resume-data]
    keep: int  # newest kept; 0 all [--keep-checkpoints]
    async_write: bool = True  # snapshot to host memory, write and commit in a background thread [--async-checkpoint]


@dataclass(frozen=True)
class LogConfig:
    backend: str  # print | loguru | wandb [--train-log-backend]
    project: str  # wandb project [--project-name]
    job_id: str  # [--job-id]
    every_steps: int  # [--log-interval]
    metrics_file: str  # JSON lines of every logged step [--metrics-file]; default <checkpoint-path>/metrics.jsonl
    tensorboard_dir: str  # [--tensorboard-dir]; default <checkpoint-path>/tensorboard
    curves_file: str  # the metrics drawn at each checkpoint and at the end: <checkpoint-path>/curves.png


@dataclass(frozen=True)
class ProfilingConfig:
    mode: str  # no-profiling | tidy_profiling | pytorch_profiling [--profiling]
    directory: str  # [--profiling-dir]
    steps: int  # optimizer steps traced [--profiling-steps]


@dataclass(frozen=True)
class JobConfig:
    dist: DistConfig
    model: ModelRunConfig
    lora: LoraRunConfig
    pipeline: PipelineConfig
    data: DataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    profiling: ProfilingConfig
    flags: dict  # every public flag as given, for metadata and wandb (secrets never are flags)
