"""Preference tuning in the trainer (--objective dpo / simpo / orpo): the loss function of the last stage, the
reference model's log-probabilities of each batch, the step's normalisation and the logged statistics.

DPO's reference is the policy's own stages with the LoRA adapters off (`adapters`: no memory), the log-probabilities
of the starting weights computed before the first step and stored beside the checkpoints (`stored`,
training/reference_store.py), or a frozen copy of the starting weights with a pipeline of its own (`copy`).
`adapters` and `copy` run forward only, once per batch, before the policy's forward and backward. The rows reach the
policy's loss inside the target (training/preference.py). SimPO and ORPO need no reference.

Rows are padded to --seq-length. At pp=1 without context parallelism, a micro-batch's sequences are packed one after
another into one row (`pack_pairs`, --pack-pairs true: documents that do not see each other, positions restarting at
each) or, with --pack-pairs false, stay in their rows; either way the micro-batch runs (policy and reference alike) on
its columns up to its last label only (`widths`, rounded up by `width_multiple`), as TRL pads a batch to its longest:
a causal model's outputs at the labelled positions do not depend on the padding after them, so the losses are those of
the padded rows. Pipeline stages exchange fixed shapes, so at pp > 1 rows stay padded to --seq-length.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist

import modules
import tasks
from comm import Layout
from config import JobConfig
from context_parallel import ContextSplit, attach_context
from pipeline_parallel import Pipeline, StagePlan
from tasks.packing import document_inputs
from training.chunked_logps import ChunkedHead, attach_chunked_head
from training.evaluation import pair_batches
from training.preference import STATS_SIZE, PreferenceLoss, context_target, stat_means, with_reference
from training.reference_store import StoredReference


def width_multiple(cfg: modules.ModelConfig, columns: int, packed: bool) -> int:
    """What a micro-batch's width is rounded up to: 8 columns (of an even number of rows: tokens in multiples of 16,
    as float8 matmuls need); an eighth of its `columns` (a multiple of 16) where FlexAttention runs (packed documents,
    soft-capped scores, sliding windows shorter than the row): it is compiled for fixed shapes, so at most eight
    widths keep it within torch.compile's limit of recompilations (the blocks go dynamic instead)."""
    flex = packed or cfg.attn_softcap or ("sliding" in cfg.layer_types and cfg.sliding_window < columns)
    return -(-columns // 128) * 16 if flex else 8


def allow_a_compile_per_width() -> None:
    """Each width a micro-batch takes may compile FlexAttention (fixed shapes) and the blocks once more, in training
    and without gradients (the reference pass): room for all of them beyond torch.compile's default of 8
    recompilations per function, past which it would run them uncompiled (FlexAttention then materialises every
    score)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * 8)  # width_multiple allows 8 widths


def micro_batch_widths(labels: torch.Tensor, micro_batches: int, multiple: int = 8) -> list[int]:
    """The columns each micro-batch of `labels` [rows, S] needs: up to its last label, rounded up to `multiple` (at
    most S); a micro-batch without any label (evaluation's filler pairs) keeps `multiple` columns."""
    widths = []
    for chunk in labels.chunk(micro_batches):
        labelled = (chunk != -100).any(0).nonzero()
        last = int(labelled[-1]) + 1 if len(labelled) else 1
        widths.append(min(labels.shape[1], -(-last // multiple) * multiple))
    return widths


def labelled_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Each row's columns up to and including its last label; 0 for a row without labels (a filler pair's)."""
    labelled = labels != -100
    return torch.where(labelled.any(1), labels.shape[1] - labelled.flip(1).int().argmax(1), 0)


def text_tokens(labels: torch.Tensor) -> int:
    """The prompt + completion tokens of pair rows `labels` [rows, S] (on the host), their padding left out: a row's
    text ends on the token its last label predicts, one column after that label (tasks/preference.py)."""
    lengths = labelled_lengths(labels)
    return int((lengths + (lengths > 0)).sum())


def pack_pairs(batch: dict, micro_batches: int) -> dict:
    """A batch of pair rows [2B, S] (tasks.PreferenceStream) with each micro-batch's rows packed into one row of
    C = its rows x S columns: its sequences one after another, each cut after its last label (nothing later counts)
    and numbered by its row in the micro-batch (`doc_ids`), positions restarting at 0, then padding (the next doc id,
    no labels). Returns input_ids, labels, position_ids, doc_ids [micro_batches, C]."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, seq = ids.shape
    per = rows // micro_batches
    columns = per * seq
    lengths = labelled_lengths(labels).tolist()
    packed = {
        "input_ids": torch.zeros(micro_batches, columns, dtype=ids.dtype),
        "labels": torch.full((micro_batches, columns), -100, dtype=labels.dtype),
        "position_ids": torch.arange(columns).repeat(micro_batches, 1),
        "doc_ids": torch.full((micro_batches, columns), per, dtype=torch.int64),
    }
    for i in range(micro_batches):
        at = 0
        for j in range(per):
            row, n = i * per + j, lengths[i * per + j]
            packed["input_ids"][i, at : at + n] = ids[row, :n]
            packed["labels"][i, at : at + n] = labels[row, :n]
            packed["position_ids"][i, at : at + n] = torch.arange(n)
            packed["doc_ids"][i, at : at + n] = j
            at += n
        packed["position_ids"][i, at:] = torch.arange(columns - at)
    return packed


def reference_kind(job: JobConfig) -> str | None:
    """ "adapters", "stored", "copy" or None (no reference: SimPO, ORPO)."""
    if job.objective.kind != "dpo":
        return None
    if job.objective.dpo_reference == "auto":
        return "adapters" if job.lora.enabled else "stored"
    return job.objective.dpo_reference


class PairTraining:
    """What --objective dpo / simpo / orpo changes in a run: its loss function (`loss_fn`, for the policy's
    pipeline), DPO's reference model, the step's normalisation, the reference pass before each batch, the logged
    statistics and the evaluation on held-out pairs."""

    def __init__(
        self,
        job: JobConfig,
        cfg: modules.ModelConfig,
        layout: Layout,
        plan: StagePlan,
        stages: list[modules.Stage],
        recompute: bool,
        compiled: bool,
        head: ChunkedHead | None,
        stream,
        tokenizer,
        steps_total: int,
        log: Callable[[str], None],
        context: ContextSplit | None = None,
    ):
        """`stream`: this rank's tasks.PreferenceStream (None on ranks that read no data); `head`: the policy's
        last stage's head under --chunked-loss (training/chunked_logps.py), else None; `context`: this rank's share
        of each sequence under --context-parallel-size."""
        self.job, self.layout, self.stages, self.holds_last = job, layout, stages, plan.holds_last
        self.stream, self.tokenizer, self.log, self.context = stream, tokenizer, log, context
        self.cut_rows = plan.num_stages == 1 and context is None  # `widths` (module docstring)
        self.packed = self.cut_rows and job.objective.pack_pairs
        dtype = getattr(torch, job.model.dtype)
        self.varlen = modules.varlen_chosen(job.model.masked_attention, cfg, dtype, layout.device, context)
        micro_rows = 2 * job.data.micro_batch_size
        columns = micro_rows * job.data.seq_length if self.packed else job.data.seq_length
        self.width_multiple = width_multiple(cfg, columns, self.packed)
        if self.cut_rows and layout.device.type == "cuda":
            allow_a_compile_per_width()
        self.packed_columns = columns if self.packed else None
        self.loss_fn = PreferenceLoss(job.objective, recompute, compiled, head, context, self.packed_columns)
        if self.packed:
            log(
                f"pairs packed: a micro-batch's {micro_rows} sequences run as documents of one row, up to its last label"
            )
        else:
            log(
                "pairs: a micro-batch's rows run up to their longest (--pack-pairs false)"
                if self.cut_rows
                else "pairs: rows padded to --seq-length (pipeline stages and context parallelism exchange fixed shapes)"
            )
        self.reference = reference_kind(job)
        self.reference_pipeline = self.reference_loss = None
        self.stored = StoredReference(job, layout, steps_total, plan.holds_last) if self.reference == "stored" else None
        self.stored_ready = False
        self.evaluating = False
        # This replica's text tokens trained since the last log line (last stage), counted on the host from the
        # batches it read: tokens/s and MFU count these, not the rows' padding, and counting needs no device sync.
        self.trained_text_tokens = 0
        if self.reference == "copy":  # the starting weights again, frozen, with a pipeline of their own
            frozen = modules.build_rank_stages(cfg, job.model, plan, layout.device)
            for param in (p for stage in frozen for p in stage.parameters()):
                param.requires_grad_(False)
            frozen_head = attach_chunked_head(frozen, job)  # chunked exactly where the policy's head is
            attach_context(frozen, layout)
            self.reference_loss = PreferenceLoss(
                job.objective, compiled=compiled, head=frozen_head, context=context, packed_columns=self.packed_columns
            )
            self.reference_pipeline = Pipeline(frozen, plan, layout, job.pipeline, self.reference_loss)

    def start_step(self, batches: list[dict], scale: float, step: int, policy: Pipeline) -> None:
        """Before optimizer step `step` + 1 (on every rank): the stored reference ready, and on the last stage the
        step's normalisation: loss scale / pairs of the step (every replica's), and for ORPO's SFT term loss scale /
        chosen completion tokens of the step; and its text tokens, counted for tokens/s."""
        data, lay = self.job.data, self.layout
        if self.stored is not None:
            if not self.stored_ready:
                self._prepare_stored(step, policy, batches)
            self.stored.cursor["train"] = step * data.accumulation
        if not self.holds_last:
            return
        self.trained_text_tokens += sum(text_tokens(b["labels"]) for b in batches)
        self.loss_fn.factor = scale / (data.batch_size * data.accumulation * lay.dp_size)
        if self.job.objective.kind == "orpo":
            chosen = sum(int((b["labels"][0::2] != -100).sum()) for b in batches)
            tokens = torch.full((), float(chosen), device=lay.device)  # a fill: a host copy would wait for the GPU
            if lay.dp_size > 1:
                dist.all_reduce(tokens, group=lay.dp_group)
            self.loss_fn.nll_factor = scale / tokens.clamp(min=1)

    def pack(self, batch: dict | None) -> dict | None:
        """`batch` as its micro-batches run: packed (`pack_pairs`) under --pack-pairs at pp=1, else as it is."""
        if not self.packed or batch is None:
            return batch
        return pack_pairs(batch, self.job.pipeline.micro_batches)

    def stage_inputs(self, batch: dict | None, widths: list[int] | None) -> dict:
        """The stages' position and document ids of a packed batch (on the device), and on varlen attention its
        documents' lengths as each micro-batch runs them (cut to its width)."""
        if not self.packed or batch is None:
            return {}
        return document_inputs(batch, self.layout.device, self.varlen, self.job.pipeline.micro_batches, widths)

    def widths(self, batch: dict | None) -> list[int] | None:
        """The columns each micro-batch of `batch` runs on (pp=1 and no context parallelism), else None: all."""
        if not self.cut_rows or batch is None:
            return None
        return micro_batch_widths(batch["labels"], self.job.pipeline.micro_batches, self.width_multiple)

    def run_batch(self, batch: dict | None, policy: Pipeline, train: bool) -> torch.Tensor | None:
        """One batch through the policy's pipeline (this rank's stages), laid out by `pack`, after the reference's
        pass over it (on every rank of the pipeline), each micro-batch on its `widths`; the summed loss on the last
        stage's ranks, else None."""
        self._commit()  # the previous batch's statistics
        batch = self.pack(batch)
        widths = self.widths(batch)
        stage_kwargs = self.stage_inputs(batch, widths)
        if self.reference == "stored":
            reference = self.stored.next_rows("eval" if self.evaluating else "train")
        elif self.reference is not None:
            reference = self._reference_pass(batch, policy, stage_kwargs, widths)
        else:
            reference = None
        return self._run(policy, batch, reference, stage_kwargs, widths, train)

    def _run(self, pipeline: Pipeline, batch, reference, stage_kwargs: dict, widths, train: bool):
        """`batch` and its loss target (labels, a packed batch's document ids, the reference's sequence
        log-probabilities) through `pipeline`: under context parallelism this rank's tokens of them."""
        input_ids = target = None
        if batch is not None:
            input_ids = batch["input_ids"].to(self.layout.device, non_blocking=True)
            target = self._target(batch, reference)
        if self.context is not None:
            input_ids, target = self.context.split(input_ids), context_target(self.context, target)
        return pipeline.run(input_ids, target, train=train, widths=widths, **stage_kwargs)

    def _target(self, batch: dict, reference: torch.Tensor | None) -> torch.Tensor:
        """`with_reference` of a batch's labels (and a packed batch's document ids)."""
        labels = batch["labels"].to(self.layout.device, non_blocking=True)
        if not self.packed:
            return with_reference(labels, reference)
        if reference is None:  # one per sequence: the rows of the batch before packing
            reference = torch.zeros(labels.shape[0] * 2 * self.job.data.micro_batch_size, dtype=torch.float64)
        return with_reference(labels, reference, batch["doc_ids"])

    def _reference_pass(self, batch: dict | None, policy: Pipeline, stage_kwargs: dict, widths) -> torch.Tensor | None:
        """The reference's sequence log-probabilities of one batch (forward only; on the last stage, else None): the
        policy's pipeline with the adapters off, the frozen copy's, or (stored, before step 1) the policy's own."""
        pipeline, loss_fn = policy, self.loss_fn
        off = modules.adapters_off(self.stages) if self.reference == "adapters" else contextlib.nullcontext()
        if self.reference == "copy":
            pipeline, loss_fn = self.reference_pipeline, self.reference_loss
        rows: list[torch.Tensor] = []
        loss_fn.recording = rows
        try:
            with off:
                self._run(pipeline, batch, None, stage_kwargs, widths, train=False)
        finally:
            loss_fn.recording = None
        return torch.cat(rows) if rows else None

    def _prepare_stored(self, step: int, policy: Pipeline, batches: list) -> None:
        """Read the stored rows, or (a run at step 0) compute them from the weights as they are now: this step's
        `batches` and those of every step to come, from a copy of the data stream, and the held-out batches."""
        self.stored_ready = True
        if self.stored.load(resuming=step > 0):
            self.log(f"DPO reference: log-probabilities read from {self.stored.folder}")
            return
        job, lay = self.job, self.layout
        count = (self.stored.identity["steps"] - step - 1) * job.data.accumulation
        stream = None
        if self.stream is not None:  # continues after this step's batches, which the trainer already took
            stream = tasks.PreferenceStream(job.data, self.tokenizer, lay.dp_rank, lay.dp_size, show_data=False)
            stream.load_state_dict(self.stream.state_dict())
        train = itertools.chain(batches, (next(stream) if stream else None for _ in range(count)))
        held_out = pair_batches(job.data, self.tokenizer, lay) if job.data.evaluation_every else []

        def run(batch: dict | None) -> torch.Tensor | None:
            batch = self.pack(batch)
            widths = self.widths(batch)
            return self._reference_pass(batch, policy, self.stage_inputs(batch, widths), widths)

        try:
            self.stored.compute(train, held_out, run, self.log)
        finally:
            if stream is not None:
                stream.close()

    def log_values(self, stream) -> tuple[dict[str, float], int | None]:
        """TRL's statistics, averaged over the pairs since the last call and every replica (last-stage ranks), and
        the pairs cut to --seq-length so far (`stream`: this rank's tasks.PreferenceStream, or None); with them the
        text tokens every replica trained since the last call (None on ranks without the last stage)."""
        self._commit()
        sums = self.loss_fn.take_stats()
        tokens, self.trained_text_tokens = self.trained_text_tokens, 0
        if not self.holds_last:
            return {}, None
        if sums is None:  # no pair since the last call, so no token either
            return {}, 0
        # The token count rides on the statistics' reduction (no collective of its own); float64 holds it exactly.
        sums = torch.cat([sums, sums.new_full((1,), tokens)])
        if self.layout.dp_size > 1:
            dist.all_reduce(sums, group=self.layout.dp_group)
        sums = sums.cpu()  # one copy for both: stat_means read the sums on the host anyway
        values = stat_means(sums[:-1], orpo=self.job.objective.kind == "orpo")
        if stream is not None:
            values["truncated_pairs"] = stream.truncated_pairs
        return values, int(sums[-1])

    def evaluate(self, batches, run_batch: Callable[[dict], torch.Tensor | None]) -> dict[str, float] | None:
        """The held-out pairs: loss and TRL's statistics under `valid.` names, on the logging rank."""
        self._commit()
        saved = self.loss_fn.take_stats()  # training's statistics since the last log wait outside
        factor, nll_factor = self.loss_fn.factor, self.loss_fn.nll_factor
        self.loss_fn.factor, self.loss_fn.nll_factor = 1.0, 0.0
        self.evaluating = True
        if self.stored is not None:
            self.stored.cursor["eval"] = 0
        pair_losses = torch.zeros((), device=self.layout.device, dtype=torch.float64)
        try:
            for batch in batches:
                loss = run_batch(batch)
                if loss is not None:
                    pair_losses += loss.double()
            self._commit()
            sums = self.loss_fn.take_stats()
        finally:
            self.loss_fn.factor, self.loss_fn.nll_factor = factor, nll_factor
            self.loss_fn.stats = saved
            self.evaluating = False
        if not self.holds_last:
            return None
        if sums is None:
            sums = torch.zeros(STATS_SIZE, device=self.layout.device, dtype=torch.float64)
        if self.context is not None:  # each cp rank reported its share of the pairs' losses
            dist.all_reduce(pair_losses, group=self.context.group)
        sums = torch.cat([sums, pair_losses[None]])
        if self.layout.dp_size > 1:
            dist.all_reduce(sums, group=self.layout.dp_group)
        if not self.layout.is_logger or sums[0] == 0:
            return None
        means = stat_means(sums[:-1], orpo=self.job.objective.kind == "orpo")
        loss = sums[-1].item() / sums[0].item() + means.get("nll_loss", 0.0)
        return {"valid.loss": loss, **{f"valid.{k}": v for k, v in means.items()}}

    def _commit(self) -> None:
        """The statistics of the batch that ran last: one loss call per micro-batch (see PreferenceLoss)."""
        self.loss_fn.commit(self.job.pipeline.micro_batches)
