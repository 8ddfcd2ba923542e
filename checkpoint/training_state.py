"""What a training checkpoint holds and how a run is restored from it.

The trainer hands over its stages and its stateful parts (`TrainState`; each part gives and takes its own state,
checkpoint/parts.py) and this room decides the rest: the metadata, which files a rank needs, the architecture check, the tied-head and master-weight
reconciliation between layouts and precisions, and the RNG. The bytes on disk (atomic saves, sha256 checks,
rotation, reading any layout's files) are store.py's job.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass

import torch

import modules
from checkpoint.names import (
    DATA_STATE,
    META,
    MODEL_SUFFIX,
    OPTIMIZER_SUFFIX,
    rng_file,
    stage_optimizer_file,
    stage_optimizer_shard_file,
    stage_state_file,
)
from checkpoint.parts import Stateful
from checkpoint.snapshot import BackgroundWrite, HostBuffers, snapshot_fits
from checkpoint.store import Checkpointer, CheckpointError, Snapshot, all_ranks, files_of
from config import CheckpointConfig, JobConfig, saved_job, to_dict
from optimizer.stage_optimizer import PER_BLOCK_STATE

FORMAT = "checkpoint/1"
# Model settings that may differ on resume: they change no weight and no function of the weights.
FREE_SETTINGS = {"hf_config_dict", "initializer_range", "max_position_embeddings", "pad_token_id"}


@dataclass
class RunInfo:
    """What the metadata says about the run besides its state."""

    model_dir: str  # named in messages
    tokenizer_dir: str  # copied into every checkpoint
    pp_mode: str
    accumulation: int  # iterations per optimizer step (meta's "iteration" counts like --total-steps)
    dtype: torch.dtype
    optimizer_kind: str
    config: dict  # the run's settings, config.to_dict(job)
    quantize_base: str = "none"
    base_seed: int | None = None  # the seed of a randomly initialised base (--load-pretrained-model false)

    @classmethod
    def of(cls, job: JobConfig) -> RunInfo:
        model = job.model
        return cls(
            model.model_dir,
            model.tokenizer_dir,
            job.pipeline.mode,
            job.data.accumulation,
            getattr(torch, model.dtype),
            job.optimizer.kind,
            to_dict(job),
            job.lora.quantize_base,
            None if model.load_pretrained else model.seed,
        )


@dataclass
class TrainState:
    """One rank's run as a checkpoint sees it: the stages (their tensors) and the parts that keep their own state
    (checkpoint/parts.py: "optimizer", "rng", "metrics", and "data" on ranks that read the data stream)."""

    model_cfg: modules.ModelConfig
    layout: object  # comm.Layout
    plan: object  # pipeline_parallel.StagePlan
    stages: list[torch.nn.Module]
    parts: dict[str, Stateful]
    tied: dict[str, str]  # {head: embedding} when the model ties them
    lora: object | None = None  # modules.LoraConfig of a LoRA run: only the adapters train and are saved

    @property
    def optimizer(self):
        """The optimizer.StageOptimizer: a part, and the owner of the trained tensors' state."""
        return self.parts["optimizer"]

    @property
    def param_names(self) -> list[str]:
        """The trained parameters, in the optimizer's order."""
        return [n for m in self.stages for n, p in m.named_parameters() if p.requires_grad]

    def param_shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for m in self.stages for n, p in m.named_parameters() if p.requires_grad}

    def stage_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the stages: every tensor, or a LoRA run's adapters (the frozen base is read
        from --model-name, named in the metadata by path and fingerprint)."""
        if self.lora is not None:
            return {k: v for m in self.stages for k, v in modules.lora_state_dict(m).items()}
        return {k: v for m in self.stages for k, v in m.state_dict().items()}


class TrainingCheckpoint:
    """Saves and restores a TrainState under --checkpoint-path; every rank calls every method."""

    def __init__(self, cfg: CheckpointConfig, layout, run: RunInfo, log):
        self.cfg = cfg
        self.layout = layout
        self.run = run
        self.log = log  # a function printing one line (rank 0 and the logging rank)
        self.store = Checkpointer(cfg.path, layout, cfg.keep)
        self.buffers = HostBuffers(layout.device)  # the async snapshot's, reused
        self.buffers_prepared = False
        self.pending = None  # the BackgroundWrite in flight
        self.copying = None  # (step, CopiesInFlight) of the last snapshot, until the next optimizer step
        self.owed = None  # the step a periodic save fell due at while the previous write was in flight
        self.metrics = []  # checkpoint timing records not yet in the metrics file

    def step_dir(self, step: int) -> str:
        return self.store.step_dir(step)

    def due(self, step: int, last_step: int) -> bool:
        """Whether to save after optimizer step `step`: every --checkpoint-steps (the final one is saved by the
        trainer in any case). With --defer-checkpoints, a save that falls due while the previous background write is
        still in flight is owed, not waited for: it is taken after the first step that finds every rank's write done
        (`poll`, the same on every rank), so training never waits for a write, and the host keeps one snapshot's
        buffers. Every rank decides alike: a write leaves `pending` only where the ranks agree (`poll`, `save`,
        `wait`). Without it, the save waits for the write (`save`) and keeps its step."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0 and self.owed is None:
            self.owed = step
            if self.pending is not None and self.cfg.defer:
                self.log(
                    f"checkpoint {step} is due while checkpoint {self.pending.step} is still being written; it is "
                    f"taken after the first step that finds that write done"
                )
        return self.owed is not None and (self.pending is None or not self.cfg.defer) and step < last_step

    # ------------------------------------------------------------------ save
    def metadata(self, state: TrainState, step: int) -> dict:
        import numpy
        import safetensors
        import transformers

        cfg, lay, plan = state.model_cfg, self.layout, state.plan
        return {
            "format": FORMAT,
            "model_type": cfg.model_type,
            "model_config": cfg.hf_config_dict,
            "shape": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size},
            "layout": {
                "pp": lay.pp_size,
                "dp": lay.dp_size,
                "cp": lay.cp_size,
                "num_stages": plan.num_stages,
                "stage_layers": plan.bounds,
                "pp_mode": self.run.pp_mode,
                "dp_mode": "sharded" if state.optimizer.sharded else "allreduce",
            },
            # Which files hold each stage's optimizer state: one per stage, or one per dp x cp rank (sharded)
            "optimizer_files": {
                str(p): [stage_optimizer_shard_file(p, r) for r in range(lay.grad_size)]
                if state.optimizer.sharded
                else [stage_optimizer_file(p)]
                for p in range(lay.pp_size)
            },
            "iteration": step * self.run.accumulation,
            "dtype": str(self.run.dtype).replace("torch.", ""),
            "config": self.run.config,
            "lora": _lora_meta(state.lora, self.run),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
                "numpy": numpy.__version__,
                "python": platform.python_version(),
            },
        }

    def save(self, state: TrainState, step: int) -> None:
        """Checkpoint `state` after optimizer step `step`. Asynchronous (--async-checkpoint true): wait for the write
        in flight, copy the state into host buffers, write it in the background; the outcome surfaces in `poll` or
        `wait`. Synchronous: write and commit now, raising CheckpointError on every rank if any rank failed."""
        started = time.perf_counter()
        due_step, self.owed = self.owed, None
        waited = self._finish_pending()  # one write in flight at a time: host memory holds one checkpoint
        snap = Snapshot(
            step,
            state.stage_tensors(),
            state.optimizer.state_tensors(state.param_names),
            state.parts["rng"].state_dict(),
            copy.deepcopy(dict(state.optimizer.state_dict(), step=step)),
            copy.deepcopy(state.parts["data"].state_dict()) if self.layout.rank == 0 else None,
            self.metadata(state, step),
            self.run.tokenizer_dir,
            optimizer_shard=self.layout.grad_rank if state.optimizer.sharded else None,
        )
        if not self.cfg.async_write:
            self.store.commit(snap)
            seconds = time.perf_counter() - started
            self.log(f"saved checkpoint {self.store.step_dir(step)} ({seconds:.1f} s)")
            self.metrics.append({"checkpoint_step": step, "checkpoint_stall_s": seconds, "checkpoint_write_s": seconds})
            return
        groups = {"stage": snap.stage_tensors, "optimizer": snap.optimizer_tensors}
        fits, sizes = snapshot_fits(self.buffers.needs(groups))
        copies = None
        if fits:
            host, copies = self.buffers.copy(groups)
            snap.stage_tensors, snap.optimizer_tensors, snap.on_host = host["stage"], host["optimizer"], True
            self.copying = (step, copies)
        else:
            self.log(
                f"WARNING: checkpoint {step} is written synchronously: its host snapshot does not fit ({sizes}); "
                f"free host memory, or pass --async-checkpoint false to say so"
            )
        stall = time.perf_counter() - started

        def write():
            if copies is not None:
                copies.join()  # the copies run while training goes on; the files need them complete
            self.store.commit(snap)

        # Inline when the snapshot did not fit: the outcome still surfaces where every rank checks.
        self.pending = BackgroundWrite(step, write, stall, background=fits)
        wait = f" (of which {waited:.1f} s waiting for the previous write)" if waited > 0.05 else ""
        owed = f" (due at step {due_step})" if due_step is not None and due_step != step else ""
        self.log(
            f"checkpoint {step}{owed}: training stalled {stall:.1f} s for the snapshot{wait}; writing it in the "
            f"background"
        )
        record = {"checkpoint_step": step, "checkpoint_stall_s": stall, "checkpoint_wait_s": waited}
        if due_step is not None and due_step != step:
            record["checkpoint_due_step"] = due_step  # owed since then: the previous write was still in flight
        self.metrics.append(record)

    def prepare(self, state: TrainState) -> None:
        """After an optimizer step that created or updated the optimizer state: allocate and pin the asynchronous
        snapshot's host buffers in the background, once, so that the first checkpoint does not stall for it."""
        if not self.cfg.async_write or self.buffers_prepared:
            return
        self.buffers_prepared = True
        groups = {"stage": state.stage_tensors(), "optimizer": state.optimizer.state_tensors(state.param_names)}
        if snapshot_fits(self.buffers.needs(groups))[0]:
            self.buffers.prepare(groups)

    def before_update(self) -> None:
        """Before the optimizer step changes weights and state: the last snapshot's copies, made while this step's
        forward and backward ran, are complete. The seconds waited count as stall (`checkpoint_copy_wait_s`)."""
        if self.copying is not None:
            step, copies = self.copying
            self.copying = None
            self.metrics.append({"checkpoint_step": step, "checkpoint_copy_wait_s": copies.wait()})

    def poll(self) -> None:
        """After each optimizer step, every rank: once every rank's background write is done, report it (its error,
        the same on every rank, is raised here). Costs one small gloo all-reduce on the host per step while a write is
        in flight, so every rank learns the outcome after the same step."""
        if self.pending is not None and all_ranks(self.pending.done(), group=self.layout.status_group):
            self._finish_pending()

    def wait(self) -> None:
        """Every rank, at the end of the run: the write in flight is complete (or its error raised) on return."""
        self._finish_pending()

    def abandon(self) -> None:
        """Training failed: let the write in flight finish (a complete checkpoint is still worth having), without
        raising; the failure that got here is the one to report."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None

    def take_metrics(self) -> list[dict]:
        """`checkpoint_stall_s` / `checkpoint_write_s` records since the last call, for the metrics file."""
        metrics, self.metrics = self.metrics, []
        return metrics

    def _finish_pending(self) -> float:
        """Wait for the write in flight; raise its error, or log it. Returns the seconds waited."""
        if self.pending is None:
            return 0.0
        started = time.perf_counter()
        write, self.pending = self.pending, None
        write.join()
        if write.error is not None:
            raise write.error
        self.log(
            f"saved checkpoint {self.store.step_dir(write.step)} ({write.write_s:.1f} s) in the background; "
            f"training stalled {write.stall_s:.1f} s for it"
        )
        self.metrics.append({"checkpoint_step": write.step, "checkpoint_write_s": write.write_s})
        return time.perf_counter() - started

    # ------------------------------------------------------------------ restore
    def resume(self, state: TrainState) -> int | None:
        """Restore `state` from `latest` and return its step (None: nothing to resume). Weights, optimizer state and
        master weights, loss scale, LR schedule, data position and (same layout) RNG states. Any layout reads any
        other's files; a checkpoint that cannot be used raises CheckpointError on every rank (or, with
        --resume-fallback, an earlier one is used)."""
        if not self.cfg.resume:
            return None
        lay, store = self.layout, self.store
        current = state.stage_tensors()
        mine = set(current)
        param_names = state.param_names

        def files_needed(meta):
            rng = [rng_file(lay.rank)] if self._same_layout(meta, state) else []
            owners = mine | set(self._tied_sources(meta, state).values())
            return files_of(meta, owners) + [stage_state_file(0), DATA_STATE] + rng

        step, meta = store.find_resume_step(
            self.metadata(state, 0),
            files_needed,
            self.cfg.fallback,
            self.log,
            {k: tuple(v.shape) for k, v in current.items()},
            meta_problem=lambda meta: self._adapter_problem(meta, state),
        )
        if step is None:
            return None
        folder = store.step_dir(step)
        self._check_same_architecture(meta, folder, state.model_cfg)
        self._check_same_optimizer(meta, folder)
        weights = store.read_tensors(step, meta, MODEL_SUFFIX, mine)
        tied = self._tied_sources(meta, state)
        opt = store.read_tensors(step, meta, OPTIMIZER_SUFFIX, set(param_names) | set(tied.values()))
        for head, embedding in tied.items():  # a separate tied head starts from the embedding's state
            for key in [k for k in opt if k.split("/", 1)[0] == embedding]:
                opt[head + key[len(embedding) :]] = opt[key]
        opt = join_pieces(opt, state.param_shapes(), folder)
        weights = state.optimizer.load_state_tensors(param_names, opt, weights)
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(weights[k])
        with open(os.path.join(folder, stage_state_file(0))) as f:
            saved = json.load(f)
        state.optimizer.load_state_dict(saved)
        data = state.parts.get("data")
        if data is not None and self.cfg.resume_data != "restart":
            with open(os.path.join(folder, DATA_STATE)) as f:
                data.load_state_dict(json.load(f), strict=self.cfg.resume_data == "exact")
        if self._same_layout(meta, state):  # another layout draws other numbers anyway
            state.parts["rng"].load_state_dict(store.read_rng(step, lay.rank))
        state.parts["metrics"].load_state_dict({"step": saved["step"]})
        layout = meta["layout"]
        restart = "; data read from the start (--resume-data restart)" if self.cfg.resume_data == "restart" else ""
        self.log(
            f"resumed from {folder} (step {saved['step']}; saved with pp={layout['pp']} x dp={layout['dp']}){restart}"
        )
        return saved["step"]

    def _adapter_problem(self, meta, state: TrainState) -> str | None:
        """Why a checkpoint's adapters (or their absence, or their base) do not fit this run, or None."""
        theirs, ours = meta.get("lora"), _lora_meta(state.lora, self.run)
        if theirs is None and ours is None:
            return None
        if ours is None:
            return (
                f"it holds LoRA adapters (r={theirs['r']}, alpha={theirs['alpha']:g}, targets "
                f"{','.join(theirs['target_modules'])}) and this run has no --lora-r; resume with --lora-r "
                f"{theirs['r']} --lora-alpha {theirs['alpha']:g} --lora-target-modules "
                f"{','.join(theirs['target_modules'])}, or export it with tools/convert_to_hf.py --merge-lora"
            )
        if theirs is None:
            return (
                "it is a full fine-tuning checkpoint and this run trains LoRA adapters (--lora-r); drop --lora-r "
                "to resume it, or export it with tools/convert_to_hf.py and train adapters on that model with a "
                "new --checkpoint-path"
            )
        for key, flag in (("r", "--lora-r"), ("alpha", "--lora-alpha"), ("target_modules", "--lora-target-modules")):
            if theirs[key] != ours[key]:
                shown = ",".join(theirs[key]) if key == "target_modules" else theirs[key]
                return f"its adapters have {key} {theirs[key]}, this run {ours[key]}; resume with {flag} {shown}"
        if theirs["base_fingerprint"] != ours["base_fingerprint"]:
            return (
                f"its adapters were trained on the base model {theirs['base_path']}, and the weights of --model-name "
                f"{self.run.model_dir} differ from that base; resume with the base they were trained on"
            )
        return None

    def _same_layout(self, meta, state: TrainState) -> bool:
        layout = meta.get("layout", {})
        lay = self.layout
        return (layout.get("pp"), layout.get("dp"), layout.get("cp", 1), layout.get("num_stages")) == (
            lay.pp_size,
            lay.dp_size,
            lay.cp_size,
            state.plan.num_stages,
        )

    @staticmethod
    def _tied_sources(meta, state: TrainState) -> dict[str, str]:
        """{head: embedding} for a separate tied head whose optimizer state the checkpoint lacks (saved with one
        stage, where head and embedding are one Parameter)."""
        saved = {k.split("/", 1)[0] for keys in meta.get("tensors", {}).values() for k in keys if "/" in k}
        names = set(state.param_names)
        return {h: e for h, e in state.tied.items() if h in names and h not in saved}

    def _check_same_architecture(self, meta, folder, cfg) -> None:
        """Shapes are checked with the files; settings that change the function without changing any shape (tied
        embeddings, residual form, rotary, norm eps, activation) must match too, or the resume is a different model."""
        saved = modules.model_config_from_dict(meta["model_config"], source=os.path.join(folder, META))
        for f in dataclasses.fields(saved):
            theirs, ours = getattr(saved, f.name), getattr(cfg, f.name)
            if f.name not in FREE_SETTINGS and theirs != ours:
                raise CheckpointError(
                    f"cannot resume from {folder}: it was trained with {f.name}={theirs!r}, the "
                    f"model of --model-name {self.run.model_dir} has {ours!r}; resume with the "
                    f"model it was trained from"
                )

    def _check_same_optimizer(self, meta, folder) -> None:
        saved = saved_job(meta).optimizer.kind
        ours = self.run.optimizer_kind
        if (saved == "8bit-adam") != (ours == "8bit-adam"):  # adam and adamw are one
            raise CheckpointError(
                f"cannot resume from {folder}: it holds {saved} state and this run has "
                f"--optimizer {ours}; resume with --optimizer {saved}, "
                f"or export it with tools/convert_to_hf.py and start a new run from that model"
            )


PIECE = re.compile(r"^(.+)\[(\d+):(\d+)\]$")


def join_pieces(tensors: dict, shapes: dict, folder: str) -> dict:
    """Whole per-parameter tensors from the pieces of a sharded checkpoint ("<param>/<state>[start:end]", elements
    of the flattened parameter, from every data-parallel rank's file); other keys pass through. Per-element state
    takes the parameter's shape; per-block state (8-bit Adam's absmax, PER_BLOCK_STATE) is the blocks in order.
    Raises CheckpointError when the pieces do not cover a tensor (a shard file missing from the metadata)."""
    out, pieces = {}, {}
    for key, value in tensors.items():
        match = PIECE.match(key)
        if match is None:
            out[key] = value
        else:
            pieces.setdefault(match.group(1), []).append((int(match.group(2)), int(match.group(3)), value))
    for key, parts in pieces.items():
        shape = shapes.get(key.split("/", 1)[0])
        if shape is None:
            continue  # not a parameter this run trains
        numel = math.prod(shape)
        parts.sort(key=lambda part: part[0])
        covered = 0
        for a, b, _ in parts:
            if a != covered:
                break
            covered = b
        if covered != numel:
            raise CheckpointError(
                f"cannot resume from {folder}: the optimizer state {key} is sharded and its pieces cover elements "
                f"[0, {covered}) of {numel}; a prank_<p>_dp_<r>_optimizer.safetensors file is missing from its "
                f"{META}. Resume from a complete checkpoint (--resume-fallback)"
            )
        joined = torch.cat([value.reshape(-1) for _, _, value in parts])
        out[key] = joined if key.split("/", 1)[1] in PER_BLOCK_STATE else joined.reshape(shape)
    return out


def _lora_meta(lora, run: RunInfo) -> dict | None:
    """The adapters' settings and their base, as the metadata of a LoRA checkpoint records them."""
    if lora is None:
        return None
    return {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "quantize_base": run.quantize_base,
        "base_path": os.path.abspath(run.model_dir),
        # a base drawn from --seed (--load-pretrained-model false) is that seed, not the files beside config.json
        "base_fingerprint": base_fingerprint(run.model_dir) if run.base_seed is None else f"seed {run.base_seed}",
    }


@functools.cache
def base_fingerprint(model_dir: str) -> str:
    """sha256 over config.json and every weight file of `model_dir`: whole files up to 64 MiB; for larger ones the
    size, the safetensors header (every tensor's name, dtype, shape and offset), a 64 KiB block every 4 MiB and the
    last MiB. Any rewrite of a tensor bigger than a few MiB changes it, and a 41 GB base takes seconds to read this
    way, not the minutes a full hash would."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name != "config.json" and not name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
            continue
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}:".encode())
        with open(path, "rb") as f:
            if size <= 64 << 20:
                digest.update(f.read())
                continue
            head = f.read(8)
            header = int.from_bytes(head, "little") if name.endswith(".safetensors") else 0
            digest.update(head + f.read(min(header, 100 << 20)))
            for offset in range(0, size, 4 << 20):
                f.seek(offset)
                digest.update(f.read(64 << 10))
            f.seek(size - (1 << 20))
            digest.update(f.read())
    return digest.hexdigest()
