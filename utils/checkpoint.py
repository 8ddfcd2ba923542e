"""Training checkpoints: atomic, verified, readable by any pipeline / data-parallel layout.

<checkpoint-path>/
  latest                               the step of the newest complete checkpoint (changed last, atomically)
  checkpoint_<step>/
    meta.json                          step, model type and config, layout, flags, versions, sha256 of every file
    prank_<p>_model.safetensors        stage p's weights, Hugging Face names (global layer index)
    prank_<p>_optimizer.safetensors    "<param name>/<state>" tensors: AdamW moments, step, fp32 master weights
    prank_<p>_state.json               LR scheduler and loss scaler
    rank_<r>_rng.safetensors           torch RNG states of global rank r
    data_state.json                    position of the training data stream
    tokenizer/                         the tokenizer files, so the checkpoint exports on its own

A save is written into `.tmp_checkpoint_<step>` by all ranks, checked across ranks, then renamed by rank 0; `latest`
moves only after that. Only replica 0 writes model and optimizer files (replicas hold identical copies).
Multi-node runs need --checkpoint-path on a filesystem every node sees.
"""
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

FAULT_ENV = "CKPT_FAULT_AFTER_FILES"  # test hook: os._exit(9) after writing this many files in a save


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the file and the fix."""


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(ok, device):
    """True on every rank iff `ok` on every rank."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _contiguous_cpu(tensors):
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def read_latest(root):
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not a step number; fix or delete it")
    return int(text)


def list_steps(root):
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit():
            steps.append(int(name[len("checkpoint_"):]))
    return sorted(steps)


class Checkpointer:
    def __init__(self, root, layout, keep):
        self.root = root
        self.layout = layout
        self.keep = keep

    def step_dir(self, step):
        return os.path.join(self.root, f"checkpoint_{step}")

    # ---------------------------------------------------------------- save
    def save(self, step, stage_tensors, optimizer_tensors, stage_state, data_state, meta, tokenizer_dir):
        """Every rank calls this. Raises CheckpointError on every rank if any rank failed to write."""
        lay = self.layout
        tmp = os.path.join(self.root, f".tmp_checkpoint_{step}")
        written, error = [], None
        try:
            if lay.rank == 0:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
        except OSError as exc:
            error = f"cannot create {tmp}: {exc.strerror or exc}"
        if not _all_ok(error is None, lay.device):
            raise CheckpointError(error or f"rank 0 could not create {tmp}; check --checkpoint-path")

        keys = {}  # safetensors file -> tensor names, so readers open only the files they need

        def write(name, writer, tensors=None):
            path = os.path.join(tmp, name)
            writer(path)
            written.append(name)
            if tensors is not None:
                keys[name] = sorted(tensors)
            fault = os.environ.get(FAULT_ENV)
            if fault and len(written) >= int(fault):
                sys.stderr.write(f"[rank {lay.rank}] {FAULT_ENV}: simulated crash while saving\n")
                os._exit(9)

        try:
            if lay.dp_rank == 0:
                p = lay.pp_rank
                write(f"prank_{p}_model.safetensors", lambda path: save_file(_contiguous_cpu(stage_tensors), path),
                      stage_tensors)
                write(f"prank_{p}_optimizer.safetensors",
                      lambda path: save_file(_contiguous_cpu(optimizer_tensors), path), optimizer_tensors)
                write(f"prank_{p}_state.json", lambda path: _write_json(path, stage_state))
            rng = {"cpu": torch.get_rng_state()}
            if lay.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(lay.device)
            write(f"rank_{lay.rank}_rng.safetensors", lambda path: save_file(rng, path))
            if lay.rank == 0:
                write("data_state.json", lambda path: _write_json(path, data_state))
                if tokenizer_dir:
                    write("tokenizer", lambda path: _copy_tokenizer(tokenizer_dir, path))
        except OSError as exc:
            error = f"rank {lay.rank} could not write checkpoint {tmp}: {exc.strerror or exc}"
        hashes = {name: _sha256(os.path.join(tmp, name)) for name in written
                  if os.path.isfile(os.path.join(tmp, name))} if error is None else {}
        gathered = [None] * lay.world_size
        dist.all_gather_object(gathered, (error, hashes, keys))
        errors = [e for e, _, _ in gathered if e]
        if errors:
            if lay.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{errors[0]}; the previous checkpoint is untouched (free space or fix "
                                  f"permissions of --checkpoint-path)")
        error = None
        if lay.rank == 0:
            try:
                files, tensors = {}, {}
                for _, h, k in gathered:
                    files.update(h)
                    tensors.update(k)
                _write_json(os.path.join(tmp, "meta.json"), dict(meta, step=step, files=files, tensors=tensors))
                _fsync_dir(tmp)
                final = self.step_dir(step)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _write_json(os.path.join(self.root, "latest.tmp"), step)
                os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
                _fsync_dir(self.root)
                self._rotate(step)
            except OSError as exc:
                error = f"could not finish checkpoint {step} in {self.root}: {exc.strerror or exc}"
        if not _all_ok(error is None, lay.device):
            raise CheckpointError(error or "rank 0 failed to finish the checkpoint; see its log")

    def _rotate(self, newest):
        if self.keep <= 0:
            return
        for step in list_steps(self.root)[:-self.keep]:
            if step < newest:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    # ---------------------------------------------------------------- load
    def _validate(self, step, expected_meta, files_needed):
        """Return (meta, None) if checkpoint `step` is usable by this rank, else (None, reason)."""
        folder = self.step_dir(step)
        meta_path = os.path.join(folder, "meta.json")
        try:
            meta = json.load(open(meta_path))
        except (OSError, ValueError) as exc:
            return None, f"{meta_path} unreadable ({exc})"
        for key in ("model_type",):
            if meta.get(key) != expected_meta[key]:
                return None, f"{meta_path} is a {meta.get(key)} checkpoint, this run trains {expected_meta[key]}"
        for key in ("num_layers", "hidden_size", "vocab_size"):
            if meta.get("shape", {}).get(key) != expected_meta["shape"][key]:
                return None, (f"{meta_path}: {key} {meta.get('shape', {}).get(key)} differs from this model's "
                              f"{expected_meta['shape'][key]}")
        for name in files_needed(meta):
            path = os.path.join(folder, name)
            if name not in meta["files"]:
                return None, f"{path} is not listed in {meta_path}"
            if not os.path.isfile(path):
                return None, f"{path} is missing"
            if _sha256(path) != meta["files"][name]:
                return None, f"{path} fails its sha256 check (truncated or modified)"
        return meta, None

    def find_resume_step(self, expected_meta, files_needed, fallback, log):
        """The step every rank resumes from (None: start fresh). Raises CheckpointError when unusable."""
        latest = read_latest(self.root)
        if latest is None:
            return None, None
        candidates = [latest] + ([s for s in reversed(list_steps(self.root)) if s < latest] if fallback else [])
        first_reason = None
        for step in candidates:
            meta, reason = self._validate(step, expected_meta, files_needed)
            if _all_ok(reason is None, self.layout.device):
                if step != latest:
                    log(f"WARNING: resuming from checkpoint {step}: checkpoint {latest} is damaged "
                        f"({first_reason})")
                return step, meta
            first_reason = first_reason or reason or "damaged on another rank"
            if not fallback:
                break
        raise CheckpointError(f"cannot resume from {self.step_dir(latest)}: {first_reason}. Fix it, pass "
                              f"--resume-fallback to use an earlier checkpoint, or --load-checkpoint false to "
                              f"start over")

    def read_tensors(self, step, meta, suffix, owners):
        """Tensors of files `*suffix` of checkpoint `step` whose name (before any "/") is in `owners`: a stage's
        weights, or its optimizer state ("<param>/<state>"), whatever layout wrote them."""
        folder = self.step_dir(step)
        out = {}
        for name, keys in sorted(meta["tensors"].items()):
            wanted = [k for k in keys if k.split("/", 1)[0] in owners]
            if not name.endswith(suffix) or not wanted:
                continue
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in wanted:
                    out[key] = f.get_tensor(key)
        return out


def files_of(meta, owners):
    """The tensor files of a checkpoint holding anything of `owners` (tensor names)."""
    return [f for f, keys in meta.get("tensors", {}).items() if any(k.split("/", 1)[0] in owners for k in keys)]


def _copy_tokenizer(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
