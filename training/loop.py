"""The training job, read as the story of a run: process group, inputs, model, data, optimizer, resume, then steps.

Each decision belongs to a component that takes its typed config section (config/sections.py): comm/ brings up the
process groups, pipeline_parallel/ plans and runs the stages, modules/ builds them, optimizer/ steps them,
data_parallel/ sums their gradients, tasks/ streams the data, checkpoint/ saves and restores every part.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

import modules
import tasks
from checkpoint.parts import RngState
from checkpoint.training_state import RunInfo, TrainingCheckpoint, TrainState
from comm import Layout, init_distributed
from comm.watchdog import Watchdog
from config import JobConfig, to_dict
from context_parallel import ContextSplit, attach_context
from modules.compile_cache import use_compile_cache
from optimizer import StageOptimizer
from pipeline_parallel import Pipeline, StagePlan, plan_stages
from tasks.packing import document_inputs
from training.chunked_logps import attach_chunked_head
from training.evaluation import evaluate, pair_batches
from training.inputs import adapters_of, check_inputs, check_offload_memory, total_optimizer_steps, use_data_cache
from training.loss import TokenMeanLoss
from training.memory_plan import check_memory_plan
from training.metrics import StepMeter
from training.pairs import PairTraining
from training.preference import PreferenceLoss
from training.profiling import make_profiler
from training.startup import StartupClock
from training.step_log import StepLog
from utils import faults
from utils.logging import make_logger


class Trainer:
    job: JobConfig
    clock: StartupClock  # launch -> first step, phase by phase (logged after the first step)
    cfg: modules.ModelConfig  # the model's config.json
    tied: dict[str, str]  # {head: embedding} when the two share weights
    layout: Layout
    watchdog: Watchdog
    log: object  # utils.logging's Logger on the logging rank, Silent elsewhere
    tokenizer: object
    lora: modules.LoraConfig | None  # the adapters of a LoRA run
    adapter_tensors: dict | None  # --lora-init's
    plan: StagePlan
    stages: list[modules.Stage]
    context: ContextSplit | None
    named_params: list[tuple[str, torch.nn.Parameter]]  # what trains: every weight, or the adapters only
    documents: bool  # --attention-mask document: every stage needs the batch's document ids
    stream: tasks.PackedStream | tasks.CachedStream | tasks.PreferenceStream | None
    steps_total: int
    optimizer: StageOptimizer
    loss_fn: TokenMeanLoss | PreferenceLoss
    pipeline: Pipeline
    pairs: PairTraining | None  # --objective dpo / simpo / orpo
    state: TrainState
    checkpoint: TrainingCheckpoint
    step: int
    step_log: StepLog
    profiler: object

    def __init__(self, job: JobConfig):
        self.job = job
        self.clock = StartupClock()
        self.clock.lap("imports")
        self._setup_process_group()
        self.clock.lap("process_group")
        self._setup_inputs()
        self.clock.lap("inputs")
        self._setup_model()  # laps "model_build" and "weights" itself
        self._setup_data()
        self.clock.lap("data")
        self._setup_optimizer()
        self.clock.lap("optimizer")
        self._setup_resume()
        self.clock.lap("resume")

    # ------------------------------------------------------------------ set-up, in order
    def _setup_process_group(self):
        job = self.job
        self.cfg = modules.load_model_config(job.model.model_dir, job.model.model_type)
        self.tied = modules.tied_parameter_names(self.cfg)
        self.layout = lay = init_distributed(job.dist, ends_group=bool(self.tied))
        self.watchdog = Watchdog(lay.rank, lay.world_size, job.dist.timeout_s).start()
        self.log = make_logger(job.log, lay.is_logger, to_dict(job))
        # Dropout (--lora-dropout) draws from torch's global generators: seeded from --seed and the rank, two runs of
        # the same flags draw the same masks (a resume restores the generator states its checkpoint saved).
        torch.manual_seed(job.model.seed * 100_003 + lay.rank)

    def _setup_inputs(self):
        """Every check that can fail on the user's inputs, before the model load (minutes for 20B)."""
        job, cfg, lay = self.job, self.cfg, self.layout
        self.tokenizer = check_inputs(job, cfg, self.log.info, lay.device)
        self.lora, self.adapter_tensors = adapters_of(job.lora, cfg, self.log.info)

        def plan_of(pp_rank):
            pipe, head_cost = job.pipeline, modules.head_cost_in_layers(cfg, job.data.seq_length)
            args = (pipe.mode, pipe.virtual_stages, job.model.layers_per_stage)
            return plan_stages(cfg.num_layers, lay.pp_size, pp_rank, *args, head_cost=head_cost)

        self.plan = plan_of(lay.pp_rank)
        check_offload_memory(job, cfg, lay, plan_of, self.lora)
        check_memory_plan(job, cfg, self.plan, lay, self.lora, self.log.info)

    def _setup_model(self):
        job, lay = self.job, self.layout
        # Every rank compiles (--compile, and FlexAttention's document mask on GPUs whatever the flag), so every
        # rank points inductor at the lasting cache.
        if job.model.compile or (lay.device.type == "cuda" and job.model.attention_mask == "document"):
            self.log.info(f"torch.compile cache: {use_compile_cache()} (runs of the same shapes reuse it)")
        self.stages = modules.build_rank_stages(
            self.cfg,
            job.model,
            self.plan,
            lay.device,
            lora=self.lora,
            quantize_base=job.lora.quantize_base,
            adapter_tensors=self.adapter_tensors,
            show_progress=lay.is_logger,
            on_phase=self.clock.lap,
        )
        self.context = attach_context(self.stages, lay)  # --context-parallel-size: each rank's share of a sequence
        if job.model.fp8 != "none":
            self.log.info(modules.float8_summary(self.stages, job.model.fp8))
        choice = job.model.masked_attention  # packed documents' kernel: their lengths are counted only for varlen
        self.varlen = modules.varlen_chosen(choice, self.cfg, getattr(torch, job.model.dtype), lay.device, self.context)
        if job.model.attention_mask == "document" and (note := modules.varlen_note(choice, self.varlen)):
            self.log.info(note)
        # The frozen base of a LoRA run gets no gradient, master copy or optimizer state.
        self.named_params = [(n, p) for m in self.stages for n, p in m.named_parameters() if p.requires_grad]
        self.log.info(
            f"model {self.cfg.model_type}: {self.cfg.num_layers} layers, hidden {self.cfg.hidden_size}; "
            f"{self.plan.num_stages} stages over pp={lay.pp_size} x dp={lay.dp_size}; stage layers {self.plan.bounds}"
        )

    def _setup_data(self):
        job, lay = self.job, self.layout
        # Under document masking every stage needs the batch's document ids, so every rank reads the data;
        # otherwise only the ranks holding the first (inputs) or last stage (labels).
        self.documents = job.model.attention_mask == "document"
        reads = self.plan.reads_data or self.documents
        show = None if lay.rank == 0 else False  # SHOW_DATA samples printed by one rank only
        self.steps_total = total_optimizer_steps(job.data, job.objective, self.tokenizer, lay, self.log.info)
        self.job = job = use_data_cache(job, self.tokenizer, lay, self.steps_total, self.log.info)  # --data-cache
        args = (job.data, self.tokenizer, lay.dp_rank, lay.dp_size, show, job.objective.preference)
        self.stream = tasks.training_stream(*args) if reads else None

    def _setup_optimizer(self):
        job, lay = self.job, self.layout
        names = {n for n, _ in self.named_params}
        # A tied head on a separate last stage is a copy of the embedding: its gradient is summed with the
        # embedding's (reduce_gradients), and it is left out of the gradient norm so it counts once.
        tied_copies = {n for n in self.tied if n in names and self.plan.num_stages > 1}
        tied_ends = {n for pair in self.tied.items() for n in pair if n in names} if lay.ends_group else set()
        if self.named_params:  # before the optimizer's gradient hooks, so that they see the fault
            faults.arm_inf_gradient(lay.rank, self.named_params[0][1], lambda: self.step + 1)
        self.optimizer = StageOptimizer(
            self.named_params,
            job.optimizer,
            lay,
            self.steps_total,
            backwards_per_step=job.data.accumulation * job.pipeline.micro_batches,
            norm_exclude=tied_copies,
            late=tied_ends,
        )
        recompute, compiled = job.model.activation_checkpointing != "none", job.model.compile
        head = attach_chunked_head(self.stages, job)
        self.loss_fn, self.pairs = TokenMeanLoss(recompute, compiled, head), None
        if job.objective.preference:  # its own loss function, and DPO's reference model
            run = (self.stream, self.tokenizer, self.steps_total, self.log.info)
            self.pairs = PairTraining(
                job, self.cfg, lay, self.plan, self.stages, recompute, compiled, head, *run, context=self.context
            )
            self.loss_fn = self.pairs.loss_fn
        self.pipeline = Pipeline(self.stages, self.plan, lay, job.pipeline, self.loss_fn)

    def _setup_resume(self):
        job, lay = self.job, self.layout
        parts = {"optimizer": self.optimizer, "rng": RngState(lay.device), "metrics": self.log}
        if self.stream is not None:
            parts["data"] = self.stream
        self.state = TrainState(self.cfg, lay, self.plan, self.stages, parts, self.tied, self.lora)
        self.checkpoint = TrainingCheckpoint(job.checkpoint, lay, RunInfo.of(job), self._announce)
        self.step = self.checkpoint.resume(self.state) or 0
        cfg, seq = self.cfg, job.data.seq_length
        flops = modules.lora_flops_per_token(cfg, self.lora, seq) if self.lora else modules.flops_per_token(cfg, seq)
        meter = StepMeter(lay.device, flops, lay.world_size, self.steps_total, self.step)
        self.step_log = StepLog(job.log, self.log, lay, meter, self.clock)
        self.profiler = make_profiler(job.profiling, lay, self.stages)

    def _announce(self, message: str):
        """Checkpoint news, printed by rank 0 and the logging rank (they may differ). One write per line: two ranks
        sharing a console must not interleave within a line."""
        if self.layout.rank == 0 or self.layout.is_logger:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    # ------------------------------------------------------------------ the run
    def train(self):
        data, lay, meter = self.job.data, self.layout, self.step_log.meter
        tokens_per_step = data.batch_size * lay.dp_size * data.accumulation * data.seq_length  # SFT's windows are full
        counted = f"{tokens_per_step} tokens per step"
        if self.pairs:  # what a step trains, whether its layout runs the padding (pp > 1) or skips it (packed, cut)
            counted = "tokens/s and MFU count the pairs' text tokens (prompt + completion of every row), not padding"
        self.log.info(
            f"training {self.steps_total} optimizer steps from step {self.step}; {counted}; peak {meter.peak_label}"
        )
        try:
            with modules.attention_backend(self.job.model.attention_backend):
                self._steps(tokens_per_step)
            if self.step > meter.start_step:
                self.checkpoint.save(self.state, self.step)
            self.checkpoint.wait()  # the final checkpoint is complete (or its error raised) before the run ends
            self.step_log.records(self.step, self.checkpoint.take_metrics())
            if self.step > meter.start_step:
                self.step_log.draw_curves()
        except Exception:
            self.step_log.write_if_ready()
            self.checkpoint.abandon()  # a background write in flight finishes before the process reports and exits
            raise
        self.profiler.finish()

    def _steps(self, tokens_per_step: int):
        data, step_log = self.job.data, self.step_log
        while self.step < self.steps_total:
            lr = self.optimizer.lr  # the rate this step uses (the scheduler advances inside the step)
            with self.profiler.step(self.step):
                loss_sum, grad_norm, skipped = self.train_step()
            self.step += 1
            if skipped is not True:  # a step skipped on the host (fp16 overflow) may have left no optimizer state yet
                self.checkpoint.prepare(self.state)  # once: the snapshot's host buffers, allocated in the background
            self.checkpoint.poll()  # a background write that finished (on every rank) is reported, or its error raised
            first, last = self.step == step_log.meter.start_step + 1, self.step == self.steps_total
            if first:
                step_log.startup(self.step)
            evaluating = bool(data.evaluation_every) and self.step % data.evaluation_every == 0
            saving = self.checkpoint.due(self.step, self.steps_total)
            if self.step % self.job.log.every_steps == 0 or last:
                # Written one step late: the values reach the host while the next step runs. Steps that wait anyway
                # (first, evaluation, checkpoint, last) write at once.
                values, pair_tokens = self._step_values(lr, grad_norm, skipped)
                step_log.step(self.step, self._reduce_loss(loss_sum), values, tokens_per_step, pair_tokens)
            if first or last or evaluating or saving:
                step_log.write()
            started = time.perf_counter()
            if evaluating:
                self.evaluate()
            if saving:
                self.checkpoint.save(self.state, self.step)
                step_log.draw_curves()
            step_log.records(self.step, self.checkpoint.take_metrics())
            step_log.meter.exclude(time.perf_counter() - started)
        step_log.write()

    def train_step(self):
        lay = self.layout
        batches = [next(self.stream) if self.stream else None for _ in range(self.job.data.accumulation)]
        loss_sum = torch.zeros((), device=lay.device)
        scale = self.optimizer.loss_scale  # the step below may change it (fp16)
        if self.pairs:
            self.pairs.start_step(batches, scale, self.step, self.pipeline)
        elif self.plan.holds_last:
            self.loss_fn.start_step(batches, scale, self.job.data, lay)
        for batch in batches:
            with self.profiler.span("iteration"):
                loss = self._run_batch(batch)
            if loss is not None:
                loss_sum += loss
        with self.profiler.span("dp_allreduce"):
            self.optimizer.reduce_gradients()  # the buckets not yet summed during the backward, and the tied ends
        self.checkpoint.before_update()  # a snapshot's copies of the weights and state are complete
        with self.profiler.span("optimizer"):
            grad_norm, skipped = self.optimizer.step()
        return loss_sum / scale, grad_norm, skipped

    def _run_batch(self, batch: dict | None, train: bool = True) -> torch.Tensor | None:
        """One batch through the pipeline (this rank's stages); the summed loss on the last stage's ranks."""
        if self.pairs:  # their layout, their reference's pass and their target are theirs
            return self.pairs.run_batch(batch, self.pipeline, train)
        device = self.layout.device
        input_ids = batch["input_ids"].to(device, non_blocking=True) if batch else None
        target = batch["labels"].to(device, non_blocking=True) if batch else None
        if self.context is not None:  # this rank's tokens; position and document ids stay whole for the masks
            input_ids, target = self.context.split(input_ids), self.context.split(target)
        return self.pipeline.run(input_ids, target, train=train, **self._document_inputs(batch))

    def _document_inputs(self, batch: dict | None) -> dict:
        """The stages' position and document ids (and on varlen attention the documents' lengths) of a
        batch under --attention-mask document; none (plain causal attention over the window) when every row holds
        one document. Decided and counted on the host: no device sync."""
        if not self.documents or batch is None or bool((batch["doc_ids"][:, 0] == batch["doc_ids"][:, -1]).all()):
            return {}
        return document_inputs(batch, self.layout.device, lengths=self.varlen)

    def _reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor | None:
        """Global mean token loss of the step on the last-stage ranks, still on the device (None elsewhere)."""
        if not self.plan.holds_last:
            return None
        loss = loss_sum.detach().clone()
        if self.layout.grad_size > 1:  # every replica's and every cp rank's share
            dist.all_reduce(loss, group=self.layout.grad_group)
        return loss

    def _step_values(self, lr: float, grad_norm, skipped: bool) -> tuple[dict, int | None]:
        """The step line's values, and for pairs the text tokens trained since the last line (across the job, on the
        last-stage ranks; None elsewhere and for SFT)."""
        # grad_norm and skipped may still be on the device (StageOptimizer.step): the step log copies them without
        # waiting, and writes "skipped" only for a step that was
        values, tokens = {"lr": lr, "grad_norm": grad_norm, "skipped": skipped}, None
        if self.job.optimizer.fp16:
            values["loss_scale"] = self.optimizer.loss_scale
        if self.optimizer.host_seconds is not None:  # --offload-optimizer cpu: the host update, and its copy waits
            values["optimizer_s"], values["optimizer_wait_s"] = self.optimizer.host_seconds
        if self.stream is not None:
            values["epochs"] = max(self.stream.epochs.values(), default=0)
        if self.pairs:
            pair_values, tokens = self.pairs.log_values(self.stream)
            values.update(pair_values)
        return values, tokens

    def evaluate(self):
        """Every rank runs the same evaluation batches (every stage must take part in each)."""
        run_batch = lambda batch: self._run_batch(batch, False)  # noqa: E731
        if self.pairs:
            scores = self.pairs.evaluate(pair_batches(self.job.data, self.tokenizer, self.layout), run_batch)
        else:
            self.loss_fn.factor = 1.0
            scores = evaluate(self.job.data, self.tokenizer, self.layout, run_batch)
        if scores is not None:
            self.log.metrics(self.step, scores)

    def close(self):
        if dist.is_initialized():
            dist.barrier()
            self.watchdog.stop()
            dist.barrier()
        if self.stream is not None:
            self.stream.close()
        self.step_log.close()
