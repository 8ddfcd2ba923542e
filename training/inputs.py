"""Start-up checks of a run's inputs, before the model load (minutes for 20B), so that a typo costs seconds: model
settings, the GPU for --fp8, data specs, the tokenizer, the optimizer's and the quantiser's libraries, the LoRA
settings and adapters, the host memory of an offloaded optimizer; and the run's length in optimizer steps."""

import dataclasses
import datetime
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import modules
import tasks
from config import DataConfig, JobConfig, LoraRunConfig, ObjectiveConfig
from optimizer import check_available, check_host_memory
from utils.host import local_ranks
from utils.logging import one_line


def check_inputs(job: JobConfig, cfg: modules.ModelConfig, warn: Callable[[str], None], device: torch.device):
    """Raise a UserError for inputs that cannot work on `device`, `warn` about ones that are likely mistakes;
    returns the tokenizer."""
    if job.model.embedding_dim is not None and job.model.embedding_dim != cfg.hidden_size:
        raise modules.ModelError(
            f"--embedding-dim {job.model.embedding_dim} differs from hidden size {cfg.hidden_size} in "
            f"{job.model.model_dir}/config.json; use --embedding-dim {cfg.hidden_size} or omit it"
        )
    if job.data.seq_length > cfg.max_position_embeddings:
        warn(
            f"WARNING: --seq-length {job.data.seq_length} is longer than the model was trained for "
            f"(max_position_embeddings {cfg.max_position_embeddings} in config.json)"
        )
    if job.model.fp8 != "none":
        modules.check_fp8_device(device)
    if tasks.is_cache(job.data.task_spec):  # a token cache (tools/prepare_data.py): its sources are tokenized
        check_cache_use(job)
    else:
        tasks.parse_task_spec(job.data.task_spec)
    if job.data.evaluation_data:
        tasks.parse_task_spec(job.data.evaluation_data, flag="--evaluation-data")
        if not job.data.evaluation_every:
            warn("WARNING: --evaluation-data is never read without --evaluation-steps N")
    if job.optimizer.loss_scale and not job.optimizer.fp16:
        warn("WARNING: --loss-scale applies to --fp16 only; this run does not scale the loss")
    check_available(job.optimizer.kind)  # --optimizer's library, e.g. bitsandbytes
    if job.optimizer.dp_mode == "sharded" and job.dist.data_size == 1:
        warn("WARNING: --dp-mode sharded with --data-group-size 1 has nothing to shard; it runs as allreduce")
    where = job.model.tokenizer_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # noqa: BLE001 - a broken file surfaces as JSON, Value or OS errors
        raise modules.ModelError(
            f"--tokenizer-name {where}: cannot load the tokenizer ({type(exc).__name__}: "
            f"{one_line(exc)[:200]}); point it at the model's tokenizer directory"
        ) from None
    if tasks.is_cache(job.data.task_spec):  # built with this tokenizer and these data settings?
        tasks.TokenCache(job.data.task_spec).check_settings(job.data, tokenizer)
    if len(tokenizer) > cfg.vocab_size:  # ids past the embedding would crash (or assert on a GPU)
        raise modules.ModelError(
            f"--tokenizer-name {where} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{cfg.vocab_size}; use the model's tokenizer"
        )
    return tokenizer


def adapters_of(lora: LoraRunConfig, cfg: modules.ModelConfig, log: Callable[[str], None]):
    """(LoraConfig, the adapter tensors of --lora-init or None), or (None, None) for full fine-tuning."""
    if not lora.enabled:
        return None, None
    lora_cfg = modules.make_lora_config(cfg, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    modules.lora.check_quantize_available(lora.quantize_base)
    adapters = None
    if lora.init_dir is not None:
        _, adapters = modules.load_peft_adapter(lora.init_dir, cfg, expect=lora_cfg)
    log(f"LoRA r={lora_cfg.r} alpha={lora_cfg.alpha:g} on {','.join(lora_cfg.target_modules)}; the base is frozen")
    return lora_cfg, adapters


def offloaded_elements(cfg: modules.ModelConfig, plans, dp: int, sharded: bool, lora=None) -> list[int]:
    """Trained elements each plan's stages hand the optimizer (1/dp of them, rounded up, under --dp-mode sharded),
    counted on stages built on the meta device: no memory, no weights read."""
    out = []
    for plan in plans:
        elements = 0
        for s in plan.stage_ids:
            with torch.device("meta"):
                stage = modules.build_stage(cfg, *plan.bounds[s], s == 0, s == plan.num_stages - 1)
                if lora is not None:
                    modules.apply_lora(stage, lora, seed=None)
            elements += sum(p.numel() for p in stage.parameters() if p.requires_grad)
        out.append(-(-elements // dp) if sharded else elements)
    return out


def check_offload_memory(job: JobConfig, cfg: modules.ModelConfig, layout, plan_of: Callable, lora=None):
    """--offload-optimizer cpu: the state of every rank on this host (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE; a
    rank launched on its own counts alone) fits in its available memory: one line saying how much is needed, before
    the model load. `plan_of(pp_rank)` is the stage plan of a pipeline rank."""
    if job.optimizer.offload != "cpu":
        return
    first = layout.rank - int(os.environ.get("LOCAL_RANK", "0"))
    plans = [plan_of(r % layout.pp_size) for r in range(first, first + local_ranks())]
    sharded = job.optimizer.dp_mode == "sharded" and layout.dp_size > 1
    check_host_memory(offloaded_elements(cfg, plans, layout.dp_size, sharded, lora))


def total_optimizer_steps(
    data: DataConfig, objective: ObjectiveConfig, tokenizer, layout, log: Callable[[str], None]
) -> int:
    """--total-steps in optimizer steps, or the steps of --nepochs passes over the data's tokens (counted once, by
    rank 0, and cached beside the data for later runs), or over its pairs under a preference objective."""
    if data.total_iterations is not None:
        steps = data.total_iterations // data.accumulation
        if tasks.is_cache(data.task_spec):  # the cache must hold every window the run will train on
            windows = steps * data.accumulation * data.batch_size * layout.dp_size
            tasks.TokenCache(data.task_spec).check_holds(windows, data.seq_length)
        return steps
    counted = [None]
    if layout.rank == 0:
        if objective.preference:
            counted[0] = tasks.count_pairs(data.task_spec)
        else:
            fmt = {
                "data_format": data.data_format,
                "text_field": data.text_field,
                "messages_field": data.messages_field,
            }
            counted[0] = tasks.count_tokens(data.task_spec, tokenizer, **fmt)
    dist.broadcast_object_list(counted, src=0)
    unit = "pairs" if objective.preference else "tokens"
    per_pass = counted[0] if objective.preference else counted[0] // data.seq_length  # pairs, or windows
    iterations = math.ceil(data.epochs * per_pass / (data.batch_size * layout.dp_size))
    steps = max(1, math.ceil(iterations / data.accumulation))
    log(f"--nepochs {data.epochs}: {counted[0]} {unit} -> {steps} optimizer steps")
    return steps


def check_cache_use(job: JobConfig) -> None:
    """A token cache holds the SFT token stream of its sources, whose passes it does not count."""
    if job.objective.preference:
        raise tasks.TaskError(
            f"--task-name {job.data.task_spec} is a token cache of SFT token windows; --objective "
            f"{job.objective.kind} reads preference pairs: give it the pair files themselves"
        )
    if job.data.epochs is not None:
        raise tasks.TaskError(
            f"--task-name {job.data.task_spec} is a token cache, which counts tokens, not passes over its sources: "
            f"give --total-steps instead of --nepochs"
        )


def use_data_cache(job: JobConfig, tokenizer, layout, steps_total: int, log: Callable[[str], None]) -> JobConfig:
    """--data-cache DIR: the job reading DIR, a token cache of its --task-name holding every window the run trains
    on. Rank 0 builds it (or tops it up) unless it already does; the other ranks wait for it on the host (a gloo
    barrier without the data-parallel timeout: tokenizing may take hours). DIR must be visible to every rank."""
    data = job.data
    if not data.cache_dir:
        return job
    windows = steps_total * data.accumulation * data.batch_size * layout.dp_size
    needed = windows * data.seq_length + 1
    if layout.rank == 0:
        cache = tasks.TokenCache(data.cache_dir) if tasks.is_cache(data.cache_dir) else None
        if cache is not None and cache.serves(data, tokenizer, needed):
            log(f"--data-cache {data.cache_dir}: reusing its {cache.tokens:,} tokens (this run needs {needed:,})")
        else:
            log(f"--data-cache {data.cache_dir}: tokenizing --task-name once ({needed:,} tokens)")
            tasks.build_cache(data, tokenizer, data.cache_dir, needed, log=log)
    if layout.world_size > 1:
        dist.monitored_barrier(group=layout.commit_group, timeout=datetime.timedelta(days=7), wait_all_ranks=True)
    return dataclasses.replace(job, data=dataclasses.replace(data, task_spec=data.cache_dir))
