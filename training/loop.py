"""The training job, read as the story of a run: layout, model, data, optimizer, resume, then steps."""

import math
import os
import platform
import time

PROCESS_START = time.time()  # launch-to-first-step is measured from here (module import ~ process start)

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

import modules
from comm import init_distributed
from comm.watchdog import Watchdog
from data_parallel import allreduce_gradients
from optimizer import StageOptimizer, check_available
from pipeline_parallel import Pipeline, split_layers, stage_ids_of_rank
from training.metrics import StepMeter
from training.profiling import make_profiler
from utils.checkpoint import Checkpointer, CheckpointError, files_of
from utils.logging import make_logger, one_line, public_flags

INJECT_INF_ENV = "INJECT_INF_GRAD"  # test hook "STEP:RANK": make one gradient inf on RANK at optimizer step STEP


def _summed_cross_entropy(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


class TokenMeanLoss:
    """Sum of token cross-entropies times `factor` = loss scale / loss tokens of the whole optimizer step.

    Eager cross-entropy materialises fp32 log-probabilities (2048 x 50k vocab x 4 bytes = 0.4 GB per sequence) and
    keeps them for backward. `compiled` fuses the fp32 cast, log-softmax and gather into one kernel that keeps only
    the logits (already held, in the model dtype) and a row max and sum for backward. Otherwise `recompute` drops
    the log-probabilities after forward and recomputes them in backward: a GPipe last stage would hold them for
    every micro-batch in flight.
    """

    def __init__(self, recompute=False, compiled=False):
        self.factor = 1.0
        self.cross_entropy = torch.compile(_summed_cross_entropy) if compiled else _summed_cross_entropy
        self.recompute = recompute and not compiled

    def __call__(self, logits, labels):
        if self.recompute and torch.is_grad_enabled():
            loss = torch.utils.checkpoint.checkpoint(self.cross_entropy, logits, labels, use_reentrant=False)
        else:
            loss = self.cross_entropy(logits, labels)
        return loss * self.factor


def model_dtype(args):
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


class Trainer:
    def __init__(self, args):
        self.args = args
        self.cfg = cfg = modules.load_model_config(args.model_name, args.model_type)
        self.tied = modules.tied_parameter_names(cfg)  # {head: embedding} when the two share weights
        self.layout = lay = init_distributed(args, ends_group=bool(self.tied))
        self.watchdog = Watchdog(lay.rank, lay.world_size, args.dist_timeout).start()
        self.log = make_logger(
            args.train_log_backend, lay.is_logger, args.project_name, args.job_id, public_flags(args), args.metrics_file
        )
        if args.embedding_dim is not None and args.embedding_dim != cfg.hidden_size:
            raise modules.ModelError(
                f"--embedding-dim {args.embedding_dim} differs from hidden size "
                f"{cfg.hidden_size} in {args.model_name}/config.json; use "
                f"--embedding-dim {cfg.hidden_size} or omit it"
            )
        if args.seq_length > cfg.max_position_embeddings:
            self.log.info(
                f"WARNING: --seq-length {args.seq_length} is longer than the model was trained for "
                f"(max_position_embeddings {cfg.max_position_embeddings} in config.json)"
            )
        self._check_inputs()
        self._build_model()
        self._build_data()
        self.steps_total = self._total_optimizer_steps()
        # A tied head on a separate last stage is a copy of the embedding: its gradient is summed with the
        # embedding's (see _sync_tied_gradients), and it is left out of the gradient norm so it counts once.
        self.tied_copies = {n for n in self.tied if n in self.param_names and self.num_stages > 1}
        self.optimizer = StageOptimizer(self.named_params, args, lay, self.steps_total, norm_exclude=self.tied_copies)
        self.loss_fn = TokenMeanLoss(recompute=args.activation_checkpointing != "none", compiled=args.compile)
        n_micro = args.batch_size // args.micro_batch_size
        self.pipeline = Pipeline(
            self.stage_modules, self.stage_ids, self.num_stages, lay, n_micro, args.pp_mode, self.loss_fn
        )
        self.checkpointer = Checkpointer(args.checkpoint_path, lay, args.keep_checkpoints)
        self.step = 0
        self.loss_tokens_seen = False
        if args.load_checkpoint:
            self._resume()
        self.meter = StepMeter(
            lay.device, modules.flops_per_token(cfg, args.seq_length), lay.world_size, self.steps_total, self.step
        )
        self.profiler = make_profiler(args, lay, self.stage_modules)

    # ------------------------------------------------------------------ set-up
    def _build_model(self):
        args, lay, cfg = self.args, self.layout, self.cfg
        virtual = args.virtual_stages if args.pp_mode == "interleaved-1f1b" else 1
        self.num_stages = lay.pp_size * virtual
        per_stage = args.num_layers if virtual == 1 else None
        if virtual > 1 and args.num_layers is not None:  # it counts a rank's layers: the same rule as one stage each
            split_layers(cfg.num_layers, lay.pp_size, args.num_layers)
        self.bounds = split_layers(
            cfg.num_layers, self.num_stages, per_stage, head_cost=modules.head_cost_in_layers(cfg, args.seq_length)
        )
        self.stage_ids = stage_ids_of_rank(lay.pp_rank, lay.pp_size, virtual)
        self.stage_modules = []
        for s in self.stage_ids:
            start, end = self.bounds[s]
            with torch.device("meta"):  # parameters are allocated once, on the device, in the training dtype
                module = modules.build_stage(
                    cfg, start, end, s == 0, s == self.num_stages - 1, args.activation_checkpointing
                )
            module = modules.materialize_stage(module, lay.device, model_dtype(args))
            if args.load_pretrained_model:
                modules.load_stage_weights(module, args.model_name)
            else:
                modules.init_stage_weights(module, cfg, args.seed)
            if args.compile:
                for block in module.modules():
                    if isinstance(block, modules.stage.family(cfg).Block):
                        block.compile()
            self.stage_modules.append(module)
        self.named_params = [(n, p) for m in self.stage_modules for n, p in m.named_parameters()]
        self.param_names = [n for n, _ in self.named_params]
        self.log.info(
            f"model {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
            f"{self.num_stages} stages over pp={lay.pp_size} x dp={lay.dp_size}; stage layers "
            f"{self.bounds}"
        )

    def _check_inputs(self):
        """Data flags, the tokenizer and the optimizer's library before the model load (minutes for 20B), so that a
        typo costs seconds."""
        from transformers import AutoTokenizer

        import tasks

        args = self.args
        tasks.parse_task_spec(args.task_name)
        if args.evaluation_data:
            tasks.parse_task_spec(args.evaluation_data, flag="--evaluation-data")
            if not args.evaluation_steps:
                self.log.info("WARNING: --evaluation-data is never read without --evaluation-steps N")
        if args.loss_scale and not args.fp16:
            self.log.info("WARNING: --loss-scale applies to --fp16 only; this run does not scale the loss")
        check_available(args.optimizer)  # --optimizer's library, e.g. bitsandbytes
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        except Exception as exc:  # noqa: BLE001 - a broken file surfaces as JSON, Value or OS errors
            raise modules.ModelError(
                f"--tokenizer-name {args.tokenizer_name}: cannot load the tokenizer "
                f"({type(exc).__name__}: {one_line(exc)[:200]}); point it at the "
                f"model's tokenizer directory"
            ) from None
        if len(self.tokenizer) > self.cfg.vocab_size:  # ids past the embedding would crash (or assert on a GPU)
            raise modules.ModelError(
                f"--tokenizer-name {args.tokenizer_name} has {len(self.tokenizer)} tokens but "
                f"the model's vocabulary has {self.cfg.vocab_size}; use the model's tokenizer"
            )

    def _build_data(self):
        """Only ranks holding the first or last stage read data (inputs / labels); all read evaluation data,
        since every stage must run the same number of evaluation batches."""
        import tasks

        args, lay = self.args, self.layout
        self.stream = None
        if self.pipeline_holds_ends():
            self.stream = tasks.PackedStream(
                args.task_name,
                self.tokenizer,
                args.seq_length,
                args.batch_size,
                lay.dp_rank,
                lay.dp_size,
                seed=args.seed,
                train_on_inputs=args.train_on_inputs,
                loss_on_bot_only=args.loss_on_bot_only,
                shuffle_buffer=args.shuffle_buffer,
                num_workers=args.data_workers,
                show_data=None if lay.rank == 0 else False,
            )  # SHOW_DATA samples printed by one rank only

    def pipeline_holds_ends(self):
        return 0 in self.stage_ids or self.holds_last

    @property
    def holds_last(self):
        """This rank computes the loss."""
        return self.num_stages - 1 in self.stage_ids

    def _total_optimizer_steps(self):
        args, lay = self.args, self.layout
        if args.total_steps is not None:
            return args.total_steps // args.gradient_accumulate_step
        import tasks

        counted = [None]
        if lay.rank == 0:  # count once, for all ranks (cached beside the data for later runs)
            counted[0] = tasks.count_tokens(args.task_name, self.tokenizer)
        dist.broadcast_object_list(counted, src=0)
        windows = counted[0] // args.seq_length
        iterations = math.ceil(args.nepochs * windows / (args.batch_size * lay.dp_size))
        steps = max(1, math.ceil(iterations / args.gradient_accumulate_step))
        self.log.info(f"--nepochs {args.nepochs}: {counted[0]} tokens -> {steps} optimizer steps")
        return steps

    # ------------------------------------------------------------------ checkpoints
    def _meta(self):
        cfg, lay, args = self.cfg, self.layout, self.args
        import numpy
        import safetensors
        import transformers

        return {
            "format": "checkpoint/1",
            "model_type": cfg.model_type,
            "model_config": cfg.hf_config_dict,
            "shape": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size},
            "layout": {
                "pp": lay.pp_size,
                "dp": lay.dp_size,
                "num_stages": self.num_stages,
                "stage_layers": self.bounds,
                "pp_mode": args.pp_mode,
            },
            "iteration": self.step * args.gradient_accumulate_step,
            "dtype": str(model_dtype(args)).replace("torch.", ""),
            "flags": public_flags(args),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
                "numpy": numpy.__version__,
                "python": platform.python_version(),
            },
        }

    def _stage_tensors(self):
        return {k: v for m in self.stage_modules for k, v in m.state_dict().items()}

    def save_checkpoint(self):
        start = time.time()
        stage_state = dict(self.optimizer.state_dict(), step=self.step)
        data_state = self.stream.state_dict() if self.layout.rank == 0 else None
        self.checkpointer.save(
            self.step,
            self._stage_tensors(),
            self.optimizer.state_tensors(self.param_names),
            stage_state,
            data_state,
            self._meta(),
            self.args.tokenizer_name,
        )
        self.log.info(f"saved checkpoint {self.checkpointer.step_dir(self.step)} ({time.time() - start:.1f} s)")

    def _resume(self):
        """Continue from `latest`: weights, optimizer state and master weights, loss scale, LR schedule, data
        position and (same layout) RNG states. Any layout reads any other's files; a checkpoint that cannot be
        used raises CheckpointError on every rank (or, with --resume-fallback, an earlier one is used)."""
        import json

        ck, lay = self.checkpointer, self.layout
        current = self._stage_tensors()
        mine = set(current)

        def same_layout(meta):
            layout = meta.get("layout", {})
            return (layout.get("pp"), layout.get("dp"), layout.get("num_stages")) == (
                lay.pp_size,
                lay.dp_size,
                self.num_stages,
            )

        def tied_sources(meta):
            """{head: embedding} for a separate tied head whose optimizer state the checkpoint lacks (saved with
            one stage, where head and embedding are one Parameter): it starts from the embedding's state."""
            saved = {k.split("/", 1)[0] for keys in meta.get("tensors", {}).values() for k in keys if "/" in k}
            return {h: e for h, e in self.tied.items() if h in self.param_names and h not in saved}

        def files_needed(meta):
            rng = [f"rank_{lay.rank}_rng.safetensors"] if same_layout(meta) else []
            owners = mine | set(tied_sources(meta).values())
            return files_of(meta, owners) + ["prank_0_state.json", "data_state.json"] + rng

        step, meta = ck.find_resume_step(
            self._meta(),
            files_needed,
            self.args.resume_fallback,
            self._warn,
            {k: tuple(v.shape) for k, v in current.items()},
        )
        if step is None:
            return
        folder = ck.step_dir(step)
        self._check_same_architecture(meta, folder)
        saved_optimizer = meta.get("flags", {}).get("optimizer", self.args.optimizer)
        if (saved_optimizer == "8bit-adam") != (self.args.optimizer == "8bit-adam"):  # adam and adamw are one
            raise CheckpointError(
                f"cannot resume from {folder}: it holds {saved_optimizer} state and this run has "
                f"--optimizer {self.args.optimizer}; resume with --optimizer {saved_optimizer}, "
                f"or export it with tools/convert_to_hf.py and start a new run from that model"
            )
        weights = ck.read_tensors(step, meta, "_model.safetensors", mine)
        tied = tied_sources(meta)
        opt = ck.read_tensors(step, meta, "_optimizer.safetensors", set(self.param_names) | set(tied.values()))
        for head, embedding in tied.items():
            for key in [k for k in opt if k.split("/", 1)[0] == embedding]:
                opt[head + key[len(embedding) :]] = opt[key]
        masters = {k[: -len("/master")]: v for k, v in opt.items() if k.endswith("/master")}
        if self.optimizer.mixed:  # a checkpoint of an fp32 run has no master copies: its weights are them
            for name in self.param_names:
                opt.setdefault(f"{name}/master", weights[name].float())
        else:  # fp32 run from a bf16/fp16 checkpoint: take the fp32 master copies, not the rounded weights
            weights.update(masters)
            opt = {k: v for k, v in opt.items() if not k.endswith("/master")}
        with torch.no_grad():
            for m in self.stage_modules:
                for k, v in m.state_dict().items():
                    v.copy_(weights[k])
        self.optimizer.load_state_tensors(self.param_names, opt)
        with open(os.path.join(folder, "prank_0_state.json")) as f:
            state = json.load(f)
        if not state.get("scaler"):  # the checkpoint had no loss scaler (fp32/bf16): keep this run's initial one
            state["scaler"] = self.optimizer.scaler.state_dict()
        self.optimizer.load_state_dict(state)
        if self.stream is not None and self.args.resume_data != "restart":
            with open(os.path.join(folder, "data_state.json")) as f:
                self.stream.load_state_dict(json.load(f), strict=self.args.resume_data == "exact")
        if same_layout(meta):
            rng = ck.read_rng(step, lay.rank)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and lay.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], lay.device)
        self.step = state["step"]
        layout = meta["layout"]
        self.log.info(
            f"resumed from {folder} (step {self.step}; saved with pp={layout['pp']} x dp={layout['dp']})"
            + ("; data read from the start (--resume-data restart)" if self.args.resume_data == "restart" else "")
        )

    def _check_same_architecture(self, meta, folder):
        """Shapes are checked with the files; settings that change the function without changing any shape (tied
        embeddings, residual form, rotary, norm eps, activation) must match too, or the resume is a different model."""
        import dataclasses

        saved = modules.model_config_from_dict(meta["model_config"], source=os.path.join(folder, "meta.json"))
        free = {"hf_config_dict", "initializer_range", "max_position_embeddings", "pad_token_id"}
        for f in dataclasses.fields(saved):
            theirs, ours = getattr(saved, f.name), getattr(self.cfg, f.name)
            if f.name not in free and theirs != ours:
                raise CheckpointError(
                    f"cannot resume from {folder}: it was trained with {f.name}={theirs!r}, the "
                    f"model of --model-name {self.args.model_name} has {ours!r}; resume with the "
                    f"model it was trained from"
                )

    def _warn(self, message):
        if self.layout.rank == 0 or self.layout.is_logger:
            print(message, flush=True)

    # ------------------------------------------------------------------ steps
    def _global_loss_tokens(self, batches):
        """Loss tokens of the whole optimizer step, summed over replicas (only the last stage needs it)."""
        count = sum((b["labels"] != -100).sum() for b in batches).to(self.layout.device, torch.float32)
        if self.layout.dp_size > 1:
            dist.all_reduce(count, group=self.layout.dp_group)
        return count

    def train_step(self):
        args, lay = self.args, self.layout
        batches = [next(self.stream) if self.stream else None for _ in range(args.gradient_accumulate_step)]
        loss_sum = torch.zeros((), device=lay.device)
        scale = self.optimizer.loss_scale  # the step below may change it (fp16)
        if self.holds_last:
            tokens = self._global_loss_tokens(batches)
            if not self.loss_tokens_seen:  # one host sync, on the run's first step only
                self._check_loss_tokens(int(tokens.item()))
            self.loss_fn.factor = scale / tokens.clamp(min=1)
        for batch in batches:
            input_ids = batch["input_ids"].to(lay.device, non_blocking=True) if batch else None
            labels = batch["labels"].to(lay.device, non_blocking=True) if batch else None
            with self.profiler.span("iteration"):
                loss = self.pipeline.run(input_ids, labels)
            if loss is not None:
                loss_sum += loss
        self._maybe_inject_inf()
        self._sync_tied_gradients()
        with self.profiler.span("dp_allreduce"):
            allreduce_gradients([p for _, p in self.named_params], lay.dp_group, lay.dp_size)
        with self.profiler.span("optimizer"):
            grad_norm, skipped = self.optimizer.step()
        return loss_sum / scale, grad_norm, skipped

    def _check_loss_tokens(self, count):
        """A first step without one label to learn means the data or the masking flags are wrong; training on
        would log loss 0 and change nothing."""
        import tasks

        if count == 0:
            args = self.args
            fix = (
                ", or drop --loss-on-bot-only"
                if args.loss_on_bot_only
                else ", or pass --train-on-inputs to learn the user turns too"
                if not args.train_on_inputs
                else ""
            )
            raise tasks.TaskError(
                f"the first step's {args.batch_size * self.layout.dp_size} sequences of "
                f"--task-name hold no token to learn: every label is masked (no assistant / "
                f"<bot> turns?); check the data{fix}"
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

    def _maybe_inject_inf(self):
        spec = os.environ.get(INJECT_INF_ENV)
        if spec:
            step, rank = (int(x) for x in spec.split(":"))
            if step == self.step + 1 and rank == self.layout.rank:
                self.named_params[0][1].grad.view(-1)[0] = float("inf")

    def _reduce_loss(self, loss_sum):
        """Global mean token loss of the step (meaningful on the last-stage ranks)."""
        loss = loss_sum.detach().clone()
        if self.layout.dp_size > 1:
            dist.all_reduce(loss, group=self.layout.dp_group)
        return loss.item()

    def evaluate(self):
        import tasks

        args, lay = self.args, self.layout
        paths = [p for p in args.evaluation_data.split(",") if p]
        total = torch.zeros(2, device=lay.device, dtype=torch.float64)  # loss sum, token count
        self.loss_fn.factor = 1.0
        batches = tasks.evaluation_batches(
            paths, self.tokenizer, args.seq_length, args.batch_size, lay.dp_rank, lay.dp_size
        )
        for i, batch in enumerate(batches):
            if args.evaluation_num_batch is not None and i >= args.evaluation_num_batch:
                break
            loss = self.pipeline.run(batch["input_ids"].to(lay.device), batch["labels"].to(lay.device), train=False)
            if loss is not None:
                total[0] += loss.double()
                total[1] += (batch["labels"] != -100).sum()
        if lay.dp_size > 1:
            dist.all_reduce(total, group=lay.dp_group)
        if lay.is_logger and total[1] > 0:
            mean = (total[0] / total[1]).item()
            self.log.metrics(self.step, {"valid.loss": mean, "valid.perplexity": math.exp(min(mean, 50))})

    def _log_step(self, loss, lr, grad_norm, skipped, tokens_per_step):
        """Called by every rank (the memory gather is collective); only the logging rank writes."""
        lay = self.layout
        memory = None
        if lay.device.type == "cuda":
            mine = torch.tensor([torch.cuda.max_memory_allocated(lay.device) / 2**30], device=lay.device)
            gathered = [torch.zeros_like(mine) for _ in range(lay.world_size)]
            dist.all_gather(gathered, mine)
            memory = [round(m.item(), 2) for m in gathered]
        if not lay.is_logger:
            return
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.args.fp16:
            values["loss_scale"] = self.optimizer.loss_scale
        if skipped:
            values["skipped"] = 1
        values.update(self.meter.measure(self.step, tokens_per_step))
        if memory:
            values["mem_gb_per_rank"] = memory
        if self.step == self.meter.start_step + 1:
            values["launch_to_first_step_s"] = time.time() - PROCESS_START
        if self.stream is not None:
            values["epochs"] = max(self.stream.epochs.values(), default=0)
        self.log.metrics(self.step, values)

    def train(self):
        args, lay = self.args, self.layout
        tokens_per_step = args.batch_size * lay.dp_size * args.gradient_accumulate_step * args.seq_length
        self.log.info(
            f"training {self.steps_total} optimizer steps from step {self.step}; "
            f"{tokens_per_step} tokens per step; peak {self.meter.peak_label}"
        )
        with modules.attention_backend(args.attention_backend):
            self._train_steps(tokens_per_step)
        if self.step > self.meter.start_step:
            self.save_checkpoint()
        self.profiler.finish()

    def _train_steps(self, tokens_per_step):
        args = self.args
        while self.step < self.steps_total:
            lr = self.optimizer.lr  # the rate this step uses (the scheduler advances inside the step)
            with self.profiler.step(self.step):
                loss_sum, grad_norm, skipped = self.train_step()
            self.step += 1
            if self.step % args.log_interval == 0 or self.step == self.steps_total:
                loss = self._reduce_loss(loss_sum) if self.holds_last else None  # a host sync: only when logged
                self._log_step(loss, lr, grad_norm, skipped, tokens_per_step)
            started = time.perf_counter()
            if args.evaluation_steps and self.step % args.evaluation_steps == 0:
                self.evaluate()
            if args.checkpoint_steps and self.step % args.checkpoint_steps == 0 and self.step < self.steps_total:
                self.save_checkpoint()
            self.meter.exclude(time.perf_counter() - started)

    def close(self):
        if dist.is_initialized():
            dist.barrier()
            self.watchdog.stop()
            dist.barrier()
        if self.stream is not None:
            self.stream.close()
        self.log.close()
