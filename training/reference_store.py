"""--dpo-reference stored: DPO's reference log-probabilities of every pair the run will train on (and of the
held-out pairs), computed once from the starting weights before the first step and kept beside the checkpoints, so
that full fine-tuning needs no second model in memory and a resumed run no second pass.

    <checkpoint-path>/reference/dp_<r>.safetensors   "train" [steps x accumulation, 2 x batch] and "eval" [batches,
                                                    2 x batch] float64 row log-probabilities of replica r, written
                                                    by its last-stage rank (atomically), with the run's identity

The identity (base weights, data settings, batch layout, steps) must match for the file to be used: a fresh run
computes and replaces a file that does not match; a resumed run (whose starting weights are gone) refuses it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint.training_state import base_fingerprint
from comm import Layout
from config import JobConfig
from utils.errors import UserError

REFERENCE_DIR = "reference"
FORMAT = "dpo-reference/1"


def reference_identity(job: JobConfig, layout: Layout, steps_total: int) -> dict:
    """What the stored log-probabilities depend on: the starting weights, the pairs and how they are batched."""
    data = job.data
    return {
        "format": FORMAT,
        "model": base_fingerprint(job.model.model_dir) if job.model.load_pretrained else f"seed {job.model.seed}",
        "tokenizer": os.path.abspath(job.model.tokenizer_dir),
        "task_spec": data.task_spec,
        "evaluation_data": data.evaluation_data,
        "seq_length": data.seq_length,
        "batch_size": data.batch_size,
        "accumulation": data.accumulation,
        "seed": data.seed,
        "shuffle_buffer": data.shuffle_buffer,
        "dp_size": layout.dp_size,
        "steps": steps_total,
        "lora_init": job.lora.init_dir,
    }


class StoredReference:
    """This replica's stored rows (on its last-stage rank), handed out in the order the run consumes them."""

    def __init__(self, job: JobConfig, layout: Layout, steps_total: int, holds_last: bool):
        self.folder = os.path.join(job.checkpoint.path, REFERENCE_DIR)
        self.path = os.path.join(self.folder, f"dp_{layout.dp_rank}.safetensors")
        self.identity = reference_identity(job, layout, steps_total)
        self.layout, self.holds_last = layout, holds_last
        self.rows: dict[str, torch.Tensor] = {}
        self.cursor = {"train": 0, "eval": 0}

    def _read(self) -> dict | None:
        """The file's identity, or None when there is none."""
        if not os.path.isfile(self.path):
            return None
        with safe_open(self.path, "pt") as f:
            return json.loads((f.metadata() or {}).get("identity", "null"))

    def load(self, resuming: bool) -> bool:
        """Take the stored rows when they belong to this run (on every rank the same answer). A resumed run
        without them cannot make them again: refused in one line."""
        mine = self._read() == self.identity if self.holds_last else True
        agreed = torch.tensor([int(mine)], device=self.layout.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        if not agreed.item():
            if resuming:
                raise UserError(
                    f"--dpo-reference stored: {self.folder} holds no reference log-probabilities for this run (missing, "
                    f"or made for other data, base, batch layout or --total-steps), and the starting weights are "
                    f"gone after step 0; resume with the flags of the first run, or use --dpo-reference copy"
                )
            return False
        if self.holds_last:
            with safe_open(self.path, "pt", device=str(self.layout.device)) as f:
                self.rows = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        return True

    def compute(self, train_batches: Iterable, eval_batches: Iterable, run_reference: Callable, log) -> None:
        """Run the starting weights over every batch the run will train on and every held-out batch (all ranks of
        the pipeline take part), and write this replica's rows."""
        started = time.perf_counter()
        rows: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        for key, batches in (("train", train_batches), ("eval", eval_batches)):
            for batch in batches:
                got = run_reference(batch)
                if got is not None:
                    rows[key].append(got)
        self.rows = {k: torch.stack(v) for k, v in rows.items() if v}
        if self.holds_last and self.layout.cp_rank == 0:  # a cp group's ranks hold the same whole-sequence rows
            os.makedirs(self.folder, exist_ok=True)
            tmp = self.path + ".tmp"
            host = {k: v.cpu().contiguous() for k, v in self.rows.items()}
            save_file(host, tmp, metadata={"identity": json.dumps(self.identity)})
            os.replace(tmp, self.path)
        count = len(rows["train"]) + len(rows["eval"])
        log(f"DPO reference: log-probabilities of {count} batches computed in {time.perf_counter() - started:.1f} s")

    def next_rows(self, key: str) -> torch.Tensor | None:
        """The next batch's rows of `key` ("train" or "eval"; None off the last stage)."""
        if not self.holds_last:
            return None
        rows = self.rows[key][self.cursor[key]]
        self.cursor[key] += 1
        return rows
