"""The training job, read as the story of a run: layout, model, data, optimizer, resume, then steps.

Each decision belongs to a component that takes its typed config section (utils/config.py): comm/ brings up the
process groups, pipeline_parallel/ plans and runs the stages, modules/ builds them, optimizer/ steps them,
data_parallel/ sums their gradients, tasks/ streams the data, checkpoint/ saves and restores everything.
"""

import math
import sys
import threading
import time

import torch
import torch.distributed as dist

import modules
from checkpoint.training_state import RunInfo, TrainingCheckpoint, TrainState
from comm import init_distributed
from comm.watchdog import Watchdog
from config import JobConfig, to_dict
from modules.compile_cache import use_compile_cache
from optimizer import StageOptimizer
from pipeline_parallel import Pipeline, plan_stages
from training.inputs import adapters_of, check_inputs, check_offload_memory
from training.loss import TokenMeanLoss
from training.metrics import PendingStepLog, StepMeter
from training.profiling import make_profiler
from training.startup import StartupClock
from utils import faults
from utils.logging import make_logger, one_line


class Trainer:
    def __init__(self, job: JobConfig):
        self.clock = clock = StartupClock()  # launch -> first step, phase by phase (logged after the first step)
        clock.lap("imports")
        self.job = job
        self.cfg = cfg = modules.load_model_config(job.model.model_dir, job.model.model_type)
        self.tied = modules.tied_parameter_names(cfg)  # {head: embedding} when the two share weights
        self.layout = lay = init_distributed(job.dist, ends_group=bool(self.tied))
        self.watchdog = Watchdog(lay.rank, lay.world_size, job.dist.timeout_s).start()
        self.log = make_logger(job.log, lay.is_logger, to_dict(job))
        clock.lap("process_group")
        # Dropout (--lora-dropout) draws from torch's global generators: seeded from --seed and the rank, two runs of
        # the same flags draw the same masks (a resume restores the generator states its checkpoint saved).
        torch.manual_seed(job.model.seed * 100_003 + lay.rank)
        self.tokenizer = check_inputs(job, cfg, self.log.info, lay.device)
        self.lora, adapters = adapters_of(job.lora, cfg, self.log.info)

        def plan_of(pp_rank):
            return plan_stages(
                cfg.num_layers,
                lay.pp_size,
                pp_rank,
                job.pipeline.mode,
                job.pipeline.virtual_stages,
                job.model.layers_per_stage,
                head_cost=modules.head_cost_in_layers(cfg, job.data.seq_length),
            )

        self.plan = plan_of(lay.pp_rank)
        check_offload_memory(job, cfg, lay, plan_of, self.lora)  # before the load, like the checks above
        clock.lap("inputs")
        # Every rank compiles (--compile, and FlexAttention's document mask on GPUs whatever the flag), so every
        # rank points inductor at the lasting cache.
        if job.model.compile or (lay.device.type == "cuda" and job.model.attention_mask == "document"):
            cache = use_compile_cache()
            self.log.info(f"torch.compile cache: {cache} (runs of the same shapes reuse it)")
        self.stages = modules.build_rank_stages(
            cfg,
            self.plan.bounds,
            self.plan.stage_ids,
            lay.device,
            getattr(torch, job.model.dtype),
            job.model.activation_checkpointing,
            job.model.compile,
            weights_dir=job.model.model_dir if job.model.load_pretrained else None,
            seed=job.model.seed,
            show_progress=lay.is_logger,
            lora=self.lora,
            quantize_base=job.lora.quantize_base,
            adapter_tensors=adapters,
            fp8=job.model.fp8,
            on_phase=clock.lap,
        )
        if job.model.fp8 != "none":
            self.log.info(modules.float8_summary(self.stages, job.model.fp8))
        # What trains: every weight, or (LoRA) the adapters only; the frozen base gets no gradient, master copy
        # or optimizer state.
        self.named_params = [(n, p) for m in self.stages for n, p in m.named_parameters() if p.requires_grad]
        self.log.info(
            f"model {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; {self.plan.num_stages} "
            f"stages over pp={lay.pp_size} x dp={lay.dp_size}; stage layers {self.plan.bounds}"
        )
        # Under document masking every stage needs the batch's document ids, so every rank reads the data;
        # otherwise only the ranks holding the first (inputs) or last stage (labels).
        self.documents = job.model.attention_mask == "document"
        self.stream = self._data_stream() if self.plan.reads_data or self.documents else None
        clock.lap("data")
        self.steps_total = self._total_optimizer_steps()
        # A tied head on a separate last stage is a copy of the embedding: its gradient is summed with the
        # embedding's (see _sync_tied_gradients), and it is left out of the gradient norm so it counts once.
        names = {n for n, _ in self.named_params}
        tied_copies = {n for n in self.tied if n in names and self.plan.num_stages > 1}
        if self.named_params:  # before the optimizer's gradient hooks, so that they see the fault
            faults.arm_inf_gradient(lay.rank, self.named_params[0][1], lambda: self.step + 1)
        # With pp > 1 both tied ends are summed over the ends group after the backward: their data-parallel
        # reduction waits for it.
        tied_ends = {n for pair in self.tied.items() for n in pair if n in names} if lay.ends_group else set()
        self.optimizer = StageOptimizer(
            self.named_params,
            job.optimizer,
            lay,
            self.steps_total,
            backwards_per_step=job.data.accumulation * job.pipeline.micro_batches,
            norm_exclude=tied_copies,
            late=tied_ends,
        )
        self.loss_fn = TokenMeanLoss(recompute=job.model.activation_checkpointing != "none", compiled=job.model.compile)
        self.pipeline = Pipeline(self.stages, self.plan, lay, job.pipeline, self.loss_fn)
        clock.lap("optimizer")
        self.state = TrainState(cfg, lay, self.plan, self.stages, self.optimizer, self.stream, self.tied, self.lora)
        run = RunInfo(
            job.model.model_dir,
            job.model.tokenizer_dir,
            job.pipeline.mode,
            job.data.accumulation,
            getattr(torch, job.model.dtype),
            job.optimizer.kind,
            to_dict(job),
            job.lora.quantize_base,
            None if job.model.load_pretrained else job.model.seed,
        )
        self.checkpoint = TrainingCheckpoint(job.checkpoint, lay, run, self._announce)
        self.step = self.checkpoint.resume(self.state) or 0
        if self.step:
            self.log.resume_at(self.step)  # the metrics file keeps each step once
        self.loss_tokens_seen = False
        flops = (
            modules.lora_flops_per_token(cfg, self.lora, job.data.seq_length)
            if self.lora
            else modules.flops_per_token(cfg, job.data.seq_length)
        )
        self.meter = StepMeter(lay.device, flops, lay.world_size, self.steps_total, self.step)
        self.profiler = make_profiler(job.profiling, lay, self.stages)
        self.pending_log = None  # the last step's metrics, written after the next step is under way
        clock.lap("resume")
        self.curves = None  # the thread drawing curves.png

    # ------------------------------------------------------------------ set-up
    def _data_stream(self):
        import tasks

        data, lay = self.job.data, self.layout
        return tasks.PackedStream(
            data.task_spec,
            self.tokenizer,
            data.seq_length,
            data.batch_size,
            lay.dp_rank,
            lay.dp_size,
            seed=data.seed,
            train_on_inputs=data.train_on_inputs,
            loss_on_bot_only=data.loss_on_bot_only,
            shuffle_buffer=data.shuffle_buffer,
            num_workers=data.workers,
            show_data=None if lay.rank == 0 else False,  # SHOW_DATA samples printed by one rank only
            **self._record_format(),
        )

    def _record_format(self):
        data = self.job.data
        return dict(data_format=data.data_format, text_field=data.text_field, messages_field=data.messages_field)

    def _total_optimizer_steps(self):
        data, lay = self.job.data, self.layout
        if data.total_iterations is not None:
            return data.total_iterations // data.accumulation
        import tasks

        counted = [None]
        if lay.rank == 0:  # count once, for all ranks (cached beside the data for later runs)
            counted[0] = tasks.count_tokens(data.task_spec, self.tokenizer, **self._record_format())
        dist.broadcast_object_list(counted, src=0)
        windows = counted[0] // data.seq_length
        iterations = math.ceil(data.epochs * windows / (data.batch_size * lay.dp_size))
        steps = max(1, math.ceil(iterations / data.accumulation))
        self.log.info(f"--nepochs {data.epochs}: {counted[0]} tokens -> {steps} optimizer steps")
        return steps

    def _announce(self, message):
        """Checkpoint news, printed by rank 0 and the logging rank (they may differ). One write per line: two ranks
        sharing a console must not interleave within a line."""
        if self.layout.rank == 0 or self.layout.is_logger:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    # ------------------------------------------------------------------ steps
    def train(self):
        data, lay = self.job.data, self.layout
        tokens_per_step = data.batch_size * lay.dp_size * data.accumulation * data.seq_length
        self.log.info(
            f"training {self.steps_total} optimizer steps from step {self.step}; {tokens_per_step} tokens per step; "
            f"peak {self.meter.peak_label}"
        )
        try:
            with modules.attention_backend(self.job.model.attention_backend):
                self._steps(tokens_per_step)
            if self.step > self.meter.start_step:
                self.checkpoint.save(self.state, self.step)
            self.checkpoint.wait()  # the final checkpoint is complete (or its error raised) before the run ends
            self._checkpoint_metrics()
            if self.step > self.meter.start_step:
                self._draw_curves()
        except Exception:
            if self.pending_log is not None and self.pending_log.ready():  # the last good step's line is not lost
                self._write_step_log()
            self.checkpoint.abandon()  # a background write in flight finishes before the process reports and exits
            raise
        self.profiler.finish()

    def _steps(self, tokens_per_step):
        data = self.job.data
        while self.step < self.steps_total:
            lr = self.optimizer.lr  # the rate this step uses (the scheduler advances inside the step)
            with self.profiler.step(self.step):
                loss_sum, grad_norm, skipped = self.train_step()
            self.step += 1
            if not skipped:
                self.checkpoint.prepare(self.state)  # once: the snapshot's host buffers, allocated in the background
            self.checkpoint.poll()  # a background write that finished (on every rank) is reported, or its error raised
            first, last = self.step == self.meter.start_step + 1, self.step == self.steps_total
            if first:
                self._log_startup()
            evaluating = bool(data.evaluation_every) and self.step % data.evaluation_every == 0
            saving = self.checkpoint.due(self.step, self.steps_total)
            if self.step % self.job.log.every_steps == 0 or last:
                # Written one step late: its values reach the host while the next step runs, so logging never
                # leaves the GPU idle between steps. Steps that wait anyway (first, evaluation, checkpoint, last)
                # write at once.
                self._write_step_log()
                self.pending_log = self._step_log(loss_sum, lr, grad_norm, skipped, tokens_per_step)
            if first or last or evaluating or saving:
                self._write_step_log()
            started = time.perf_counter()
            if evaluating:
                self.evaluate()
            if saving:
                self.checkpoint.save(self.state, self.step)
                self._draw_curves()
            self._checkpoint_metrics()
            self.meter.exclude(time.perf_counter() - started)
        self._write_step_log()

    def _log_startup(self):
        """After this process's first step: its start-up phases, one line and one metrics record."""
        if self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)  # the first step's kernels (and compilation) have run
        self.clock.lap("first_step")
        self.log.record(self.step, {"startup_s": self.clock.since_start()}, self.clock.line())

    def train_step(self):
        lay = self.layout
        batches = [next(self.stream) if self.stream else None for _ in range(self.job.data.accumulation)]
        loss_sum = torch.zeros((), device=lay.device)
        scale = self.optimizer.loss_scale  # the step below may change it (fp16)
        if self.plan.holds_last:
            tokens = self._global_loss_tokens(batches)
            if not self.loss_tokens_seen:  # one host sync, on the run's first step only
                self._check_loss_tokens(int(tokens.item()))
            self.loss_fn.factor = scale / tokens.clamp(min=1)
        for batch in batches:
            input_ids = batch["input_ids"].to(lay.device, non_blocking=True) if batch else None
            labels = batch["labels"].to(lay.device, non_blocking=True) if batch else None
            with self.profiler.span("iteration"):
                loss = self.pipeline.run(input_ids, labels, **self._document_inputs(batch))
            if loss is not None:
                loss_sum += loss
        self._sync_tied_gradients()
        with self.profiler.span("dp_allreduce"):
            self.optimizer.reduce_gradients()  # the buckets not yet summed during the backward, and the tied ends
        self.checkpoint.before_update()  # a snapshot's copies of the weights and state are complete
        with self.profiler.span("optimizer"):
            grad_norm, skipped = self.optimizer.step()
        return loss_sum / scale, grad_norm, skipped

    def _document_inputs(self, batch):
        """The stages' position and document ids of a batch under --attention-mask document; none (plain causal
        attention over the window) when every row holds one document, decided on the host: no device sync."""
        if not self.documents or batch is None:
            return {}
        doc_ids = batch["doc_ids"]
        if bool((doc_ids[:, 0] == doc_ids[:, -1]).all()):
            return {}
        device = self.layout.device
        return {
            "position_ids": batch["position_ids"].to(device, non_blocking=True),
            "doc_ids": doc_ids.to(device, non_blocking=True),
        }

    def _global_loss_tokens(self, batches):
        """Loss tokens of the whole optimizer step, summed over replicas (only the last stage needs it)."""
        count = sum((b["labels"] != -100).sum() for b in batches).to(self.layout.device, torch.float32)
        if self.layout.dp_size > 1:
            dist.all_reduce(count, group=self.layout.dp_group)
        return count

    def _check_loss_tokens(self, count):
        """A first step without one label to learn means the data or the masking flags are wrong; training on
        would log loss 0 and change nothing."""
        import tasks

        if count == 0:
            data = self.job.data
            fix = (
                ", or drop --loss-on-bot-only"
                if data.loss_on_bot_only
                else ", or pass --train-on-inputs to learn the user turns too"
                if not data.train_on_inputs
                else ""
            )
            raise tasks.TaskError(
                f"the first step's {data.batch_size * self.layout.dp_size} sequences of --task-name hold no token to "
                f"learn: every label is masked (no assistant / <bot> turns?); check the data{fix}"
            )
        self.loss_tokens_seen = True

    def _sync_tied_gradients(self):
        """Tied embeddings split over two stages: both copies get the sum of their gradients, so both take the
        same update and stay equal."""
        if self.layout.ends_group is None:  # created only for tied embeddings with pp > 1
            return
        params = dict(self.named_params)
        for name in [n for pair in self.tied.items() for n in pair if n in params]:  # this rank holds one end
            param = params[name]
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.layout.ends_group)

    def _reduce_loss(self, loss_sum):
        """Global mean token loss of the step (meaningful on the last-stage ranks), still on the device."""
        loss = loss_sum.detach().clone()
        if self.layout.dp_size > 1:
            dist.all_reduce(loss, group=self.layout.dp_group)
        return loss

    def evaluate(self):
        """Every rank runs the same evaluation batches (every stage must take part in each)."""
        import tasks

        data, lay = self.job.data, self.layout
        paths = [p for p in data.evaluation_data.split(",") if p]
        total = torch.zeros(2, device=lay.device, dtype=torch.float64)  # loss sum, token count
        self.loss_fn.factor = 1.0
        batches = tasks.evaluation_batches(
            paths,
            self.tokenizer,
            data.seq_length,
            data.batch_size,
            lay.dp_rank,
            lay.dp_size,
            train_on_inputs=data.train_on_inputs,  # the loss counts the tokens training learns
            loss_on_bot_only=data.loss_on_bot_only,
            **self._record_format(),
        )
        for i, batch in enumerate(batches):
            if data.evaluation_batches is not None and i >= data.evaluation_batches:
                break
            loss = self.pipeline.run(
                batch["input_ids"].to(lay.device),
                batch["labels"].to(lay.device),
                train=False,
                **self._document_inputs(batch),
            )
            if loss is not None:
                total[0] += loss.double()
                total[1] += (batch["labels"] != -100).sum()
        if lay.dp_size > 1:
            dist.all_reduce(total, group=lay.dp_group)
        if lay.is_logger and total[1] > 0:
            mean = (total[0] / total[1]).item()
            self.log.metrics(self.step, {"valid.loss": mean, "valid.perplexity": math.exp(min(mean, 50))})

    def _step_log(self, loss_sum, lr, grad_norm, skipped, tokens_per_step):
        """Every rank calls this (the loss and memory reductions are collective): the step's values, with its
        device tensors on their way to the host (copies that do not wait for the GPU)."""
        lay = self.layout
        tensors = {}
        if self.plan.holds_last:
            tensors["loss"] = self._reduce_loss(loss_sum)
        if lay.device.type == "cuda":
            mine = torch.tensor([torch.cuda.max_memory_allocated(lay.device) / 2**30], device=lay.device)
            gathered = [torch.zeros_like(mine) for _ in range(lay.world_size)]
            dist.all_gather(gathered, mine)
            tensors["memory"] = torch.cat(gathered)
        values = {"lr": lr, "grad_norm": grad_norm}
        if self.job.optimizer.fp16:
            values["loss_scale"] = self.optimizer.loss_scale
        if skipped:
            values["skipped"] = 1
        if self.optimizer.host_seconds is not None:  # --offload-optimizer cpu: the host update, and its copy waits
            values["optimizer_s"], values["optimizer_wait_s"] = self.optimizer.host_seconds
        if self.stream is not None:
            values["epochs"] = max(self.stream.epochs.values(), default=0)
        if lay.is_logger:  # timed here, at the step's end on the host, however late the line is written
            values.update(self.meter.measure(self.step, tokens_per_step))
            if self.step == self.meter.start_step + 1:
                values["launch_to_first_step_s"] = time.time() - self.clock.start
        return PendingStepLog(self.step, values, tensors)

    def _write_step_log(self):
        """The pending step's metrics line, once its values are on the host; only the logging rank writes."""
        pending, self.pending_log = self.pending_log, None
        if pending is None or not self.layout.is_logger:
            return
        host = pending.wait()
        values = {"loss": host["loss"].item() if "loss" in host else None, **pending.values}
        if "memory" in host:
            values["mem_gb_per_rank"] = [round(m, 2) for m in host["memory"].tolist()]
        self.log.metrics(pending.step, values)

    def _checkpoint_metrics(self):
        """The stall and write seconds of checkpoints, as their own records of the metrics file."""
        for values in self.checkpoint.take_metrics():
            if self.layout.is_logger:
                self.log.metrics(self.step, values)

    def _draw_curves(self):
        """The run's metrics as a PNG beside its checkpoints, drawn by a background thread: the first plot imports
        matplotlib (seconds), and the other ranks would wait for the logging rank meanwhile. One at a time; a plot
        never stops training."""
        if not self.layout.is_logger:
            return
        if self.curves is not None:
            self.curves.join()
        self.curves = threading.Thread(target=self._plot_curves, name="curves", daemon=True)
        self.curves.start()

    def _plot_curves(self):
        from tools.plot_metrics import MetricsError, plot_metrics

        try:
            plot_metrics([self.job.log.metrics_file], self.job.log.curves_file)
        except (MetricsError, OSError, ValueError) as exc:
            self.log.info(f"WARNING: could not draw {self.job.log.curves_file}: {one_line(exc)}")

    def close(self):
        if dist.is_initialized():
            dist.barrier()
            self.watchdog.stop()
            dist.barrier()
        if self.curves is not None:
            self.curves.join()  # the final curves, drawn while the other ranks finished
        if self.stream is not None:
            self.stream.close()
        self.log.close()
