"""Training checkpoints: atomic, verified, readable by any pipeline / data-parallel layout.

<checkpoint-path>/
  latest                               the step of the newest complete checkpoint (changed last, atomically)
  checkpoint_<step>/
    meta.json                          step, model type and config, layout, flags, versions; sha256 and size of
                                       every file, tensor names of every safetensors file
    prank_<p>_model.safetensors        stage p's weights, Hugging Face names (global layer index)
    prank_<p>_optimizer.safetensors    "<param name>/<state>" tensors: AdamW moments, step, fp32 master weights
    prank_<p>_dp_<r>_optimizer.safetensors  instead, under --dp-mode sharded: data-parallel rank r's pieces of them,
                                       "<param name>/<state>[start:end]" (elements of the flattened parameter); 0-d
                                       state ("step") and 8-bit Adam's codebooks whole, in the file of the piece
                                       starting at 0 (optimizer.stage_optimizer names each state's kind)
    prank_<p>_state.json               LR scheduler and loss scaler
    rank_<r>_rng.safetensors           torch RNG states of global rank r (restored when the layout is the same)
    data_state.json                    position of the training data stream
    tokenizer/                         the tokenizer files, so the checkpoint exports on its own

A save (`Checkpointer.commit` of a `Snapshot`, on the training thread or, with --async-checkpoint, a background
thread: checkpoint/snapshot.py) is written into `.tmp_checkpoint_<step>` by all ranks (every file fsynced), checked
across ranks through the gloo commit group, then renamed by rank 0; `latest` moves only after that, and older
checkpoints are rotated out (and stale `.tmp_*` folders of crashed saves removed) only after that. Only replica 0
writes model and optimizer files (replicas hold identical copies); under --dp-mode sharded every replica writes its
own optimizer shard (nothing is gathered to one rank). Multi-node runs need --checkpoint-path on a filesystem every
node sees. Nothing read from disk is unpickled: tensors go through safetensors, everything else through JSON.

Fault-injection hooks for the tests (a crash or a full disk mid-save) are in utils/faults.py.
"""

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint.names import (
    DATA_STATE,
    LATEST,
    META,
    MODEL_SUFFIX,
    TMP_PREFIX,
    TOKENIZER_DIR,
    rng_file,
    stage_model_file,
    stage_optimizer_file,
    stage_optimizer_shard_file,
    stage_state_file,
    step_dir_name,
)
from utils import faults
from utils.errors import UserError
from utils.logging import one_line
from utils.progress import progress, progress_enabled

MIB = 1 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or used; the message names the file and the fix."""


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(folder, meta, name):
    """Why checkpoint file `name` cannot be trusted (missing, truncated, modified), or None. `meta` is the folder's
    meta.json, which lists every file's sha256 and size."""
    path = os.path.join(folder, name)
    if name not in meta["files"]:
        return f"{path} is not listed in {os.path.join(folder, 'meta.json')}"
    if not os.path.isfile(path):
        return f"{path} is missing"
    size, expected_size = os.path.getsize(path), meta.get("sizes", {}).get(name)
    if expected_size is not None and size != expected_size:
        return f"{path} is truncated or modified ({size} bytes, {expected_size} written)"
    if _sha256(path) != meta["files"][name]:
        return f"{path} fails its sha256 check (modified or corrupted)"
    return None


def _fsync(path):
    """Flush a file's or a folder's entries to disk (a folder: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc):
    """One line for an exception (safetensors reports I/O failures with its own error type)."""
    return one_line(exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def all_ranks(ok, group):
    """True on every rank iff `ok` on every rank of `group` (a gloo group: the commit's or the status check's)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() == 0


def _contiguous_cpu(tensors):
    """CPU copies safetensors can write: contiguous, and no two sharing memory (tied embeddings)."""
    out, storages = {}, set()
    for key, value in tensors.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        out[key] = tensor
    return out


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tensor_bytes(path: str) -> dict[str, int]:
    """{tensor name: bytes} of a safetensors file, from its header (an 8-byte length, then JSON with each tensor's
    data_offsets): the size of a read is known before the read."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return {key: info["data_offsets"][1] - info["data_offsets"][0] for key, info in header.items()}


def _drain(work: Iterable[int], total_bytes: int, desc: str, show: bool) -> None:
    """Run `work`, a generator doing its job piece by piece and yielding each piece's bytes once done, under a bar
    in MiB when `show` and utils.progress allow one (a terminal, or SHOW_PROGRESS=1). progress() counts items, so
    the bar is fed one tick per MiB finished."""

    def ticks() -> Iterator[None]:
        done = shown = 0
        for nbytes in work:
            done += nbytes
            while shown < -(-done // MIB):
                shown += 1
                yield

    for _ in progress(ticks(), desc, -(-total_bytes // MIB), "MiB", show):
        pass  # the loop drives the work, bar or not


def read_latest(root):
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(4096).decode("ascii", errors="replace").strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_describe(exc)}") from None
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"{path} holds {text[:40]!r}, not a step number; write the step of a complete "
            f"checkpoint_<step> into it, or delete it to start over"
        )
    return int(text)


def list_steps(root):
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("checkpoint_") and name[len("checkpoint_") :].isdigit():
            steps.append(int(name[len("checkpoint_") :]))
    return sorted(steps)


@dataclass
class Snapshot:
    """Everything one rank writes for checkpoint `step`, captured at one moment. `on_host`: the tensors are private
    contiguous host copies (checkpoint/snapshot.py), so the write may run while training changes the live ones;
    otherwise they are the live tensors and the write must finish before training goes on."""

    step: int
    stage_tensors: dict
    optimizer_tensors: dict
    rng: dict  # {"cpu": ..., ["cuda": ...]} torch RNG states
    stage_state: dict  # LR scheduler and loss scaler, and the step
    data_state: dict | None  # the data stream's position (rank 0)
    meta: dict
    tokenizer_dir: str | None
    optimizer_shard: int | None = None  # this rank's data-parallel rank under --dp-mode sharded
    on_host: bool = False


class Checkpointer:
    def __init__(self, root, layout, keep):
        self.root = root
        self.layout = layout
        self.keep = keep

    def step_dir(self, step):
        return os.path.join(self.root, step_dir_name(step))

    # ---------------------------------------------------------------- save
    def commit(self, snap: Snapshot) -> None:
        """Write `snap` into `.tmp_checkpoint_<step>`, agree across ranks, rename, move `latest`, rotate. Its
        collectives go through the layout's commit group only, so a background thread may run it while the training
        thread runs its own. Raises CheckpointError on every rank if any rank failed."""
        lay, step = self.layout, snap.step
        group = lay.commit_group
        tmp = os.path.join(self.root, TMP_PREFIX + step_dir_name(step))
        untouched = "; the previous checkpoint and `latest` are untouched"
        error = None
        if lay.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
            except OSError as exc:
                error = f"cannot create checkpoint folder {tmp}: {_describe(exc)}"
        if not all_ranks(error is None, group):
            raise CheckpointError(
                f"checkpoint {step} not saved: {error or 'rank 0 could not create ' + tmp}"
                f"{untouched}. --checkpoint-path must be a writable directory"
            )

        files, sizes, keys = {}, {}, {}  # keys: safetensors file -> tensor names (readers open only what they need)
        written = []

        def write(name: str, writer: Callable[[str], None], tensors: dict[str, torch.Tensor] | None = None) -> int:
            """Write, fsync and hash one file (or folder) of the checkpoint; returns its tensor bytes (for the bar)."""
            path = os.path.join(tmp, name)
            faults.before_checkpoint_file(step, lay.rank, path)
            writer(path)
            paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
            for full in paths:
                _fsync(full)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                files[rel], sizes[rel] = _sha256(full), os.path.getsize(full)
            if tensors is not None:
                keys[name] = sorted(tensors)
            written.append(name)
            faults.after_checkpoint_files(step, lay.rank, len(written))
            return 0 if tensors is None else _nbytes(tensors)

        def tensors_file(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
            # a snapshot is already contiguous host memory; live tensors are copied one file at a time
            return lambda path: save_file(tensors if snap.on_host else _contiguous_cpu(tensors), path)

        # This rank's files, in order: (name, writer, tensors it holds)
        plan: list[tuple[str, Callable[[str], None], dict[str, torch.Tensor] | None]] = []
        if lay.grad_rank == 0:  # one replica writes the stage (the cp ranks of a replica hold the same weights)
            p = lay.pp_rank
            plan.append((stage_model_file(p), tensors_file(snap.stage_tensors), snap.stage_tensors))
            if snap.optimizer_shard is None:
                plan.append((stage_optimizer_file(p), tensors_file(snap.optimizer_tensors), snap.optimizer_tensors))
            plan.append((stage_state_file(p), lambda path: _write_json(path, snap.stage_state), None))
        if snap.optimizer_shard is not None:
            shard_file = stage_optimizer_shard_file(lay.pp_rank, snap.optimizer_shard)
            plan.append((shard_file, tensors_file(snap.optimizer_tensors), snap.optimizer_tensors))
        plan.append((rng_file(lay.rank), lambda path: save_file(snap.rng, path), None))
        if lay.rank == 0:
            plan.append((DATA_STATE, lambda path: _write_json(path, snap.data_state), None))
            if snap.tokenizer_dir:
                plan.append((TOKENIZER_DIR, lambda path: _copy_tokenizer(snap.tokenizer_dir, path), None))
        total = sum(_nbytes(tensors) for _, _, tensors in plan if tensors is not None)
        # A background write draws no bar: the training thread's step lines own the console meanwhile.
        show = lay.is_logger and not snap.on_host
        try:
            faults.before_checkpoint_files(step)
            _drain((write(*entry) for entry in plan), total, f"saving checkpoint {step}", show)
        except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' error for the same I/O failures
            where = exc.filename if isinstance(exc, OSError) and exc.filename else os.path.join(tmp, "")
            error = f"rank {lay.rank} could not write {where}: {_describe(exc)}"
        gathered = [None] * lay.world_size
        dist.all_gather_object(gathered, (error, files, sizes, keys), group=group)
        errors = [e for e, _, _, _ in gathered if e]
        if errors:
            if lay.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint {step} not saved: {errors[0]}{untouched}. Free space on, or fix the "
                f"permissions of, --checkpoint-path {self.root}"
            )

        error = None
        if lay.rank == 0:
            try:
                all_files, all_sizes, all_keys = {}, {}, {}
                for _, f, z, k in gathered:
                    all_files.update(f)
                    all_sizes.update(z)
                    all_keys.update(k)
                _write_json(
                    os.path.join(tmp, META),
                    dict(snap.meta, step=step, files=all_files, sizes=all_sizes, tensors=all_keys),
                )
                _fsync(tmp)
                final = self.step_dir(step)
                if os.path.exists(final):  # a leftover of an abandoned run: move it aside, never delete in place
                    old = os.path.join(self.root, f"{TMP_PREFIX}replaced_checkpoint_{step}")
                    if os.path.exists(old):
                        shutil.rmtree(old)
                    os.rename(final, old)
                os.rename(tmp, final)
                _fsync(self.root)
                latest_tmp = os.path.join(self.root, TMP_PREFIX + LATEST)
                with open(latest_tmp, "w") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(latest_tmp, os.path.join(self.root, LATEST))
                _fsync(self.root)
            except OSError as exc:
                error = f"could not finish checkpoint {step} in {self.root}: {_describe(exc)}"
        if not all_ranks(error is None, group):
            raise CheckpointError(error or f"rank 0 could not finish checkpoint {step}; see its log")
        if lay.rank == 0:
            self._clean(step)
        faults.after_checkpoint(step)

    def _clean(self, newest):
        """After checkpoint `newest` is complete: drop leftovers of crashed saves and rotate old checkpoints.
        Best effort: a failure here never harms a complete checkpoint."""
        doomed = [name for name in os.listdir(self.root) if name.startswith(TMP_PREFIX)]
        if self.keep > 0:
            # A later step on disk is a leftover of an abandoned run (resumed from an earlier checkpoint): it does
            # not count among the `keep` newest of this one.
            mine = [step for step in list_steps(self.root) if step <= newest]
            for step in mine[: -self.keep]:  # never `newest`: it is the last of `mine`
                # rename first, so a kill mid-delete never leaves a half checkpoint_<step>
                name = f"{TMP_PREFIX}deleting_checkpoint_{step}"
                try:
                    os.rename(self.step_dir(step), os.path.join(self.root, name))
                    doomed.append(name)
                except OSError as exc:
                    sys.stderr.write(f"warning: could not remove {self.step_dir(step)}: {_describe(exc)}\n")
        for name in doomed:
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass

    # ---------------------------------------------------------------- load
    def _validate(self, step, expected_meta, files_needed, expected_shapes, meta_problem=None):
        """Return (meta, None) if checkpoint `step` is usable by this rank, else (None, reason)."""
        folder = self.step_dir(step)
        meta_path = os.path.join(folder, META)
        if not os.path.isdir(folder):
            return None, f"{folder} does not exist"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            return None, f"{meta_path} is missing or unreadable ({_describe(exc)})"
        try:
            if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or meta.get("step") != step:
                return None, f"{meta_path} is not the metadata of a complete checkpoint {step}"
            if meta.get("model_type") != expected_meta["model_type"]:
                return None, (
                    f"{folder} is a {meta.get('model_type')} checkpoint, this run trains "
                    f"{expected_meta['model_type']} (--model-name)"
                )
            for key in ("num_layers", "hidden_size", "vocab_size"):
                theirs, ours = meta.get("shape", {}).get(key), expected_meta["shape"][key]
                if theirs != ours:
                    return None, (f"{folder} is of another model: {key} {theirs}, this model (--model-name) has {ours}")
            problem = meta_problem(meta) if meta_problem else None
            if problem:
                return None, f"{folder}: {problem}"
            for name in files_needed(meta):
                problem = file_problem(folder, meta, name)
                if problem:
                    return None, problem
            if expected_shapes:
                found = {}
                for name in files_of(meta, expected_shapes):
                    if name.endswith(MODEL_SUFFIX):
                        with safe_open(os.path.join(folder, name), framework="pt") as f:
                            for key in f.keys():
                                if key in expected_shapes:
                                    found[key] = tuple(f.get_slice(key).get_shape())
                for key, shape in sorted(expected_shapes.items()):
                    if key not in found:
                        return None, f"{folder} lacks tensor {key} of this model (another model's checkpoint?)"
                    if found[key] != tuple(shape):
                        return None, (
                            f"{folder} is of another model: {key} has shape {list(found[key])}, this "
                            f"model (--model-name) needs {list(shape)}"
                        )
        except Exception as exc:  # noqa: BLE001 - any damage is a reason, never a crash on one rank only
            return None, f"{folder} is damaged ({_describe(exc)})"
        return meta, None

    def _agree(self, reason):
        """The first rank's reason, on every rank (None when every rank can use the checkpoint)."""
        reasons = [None] * self.layout.world_size
        dist.all_gather_object(reasons, reason)
        return next((r for r in reasons if r), None)

    def find_resume_step(self, expected_meta, files_needed, fallback, log, expected_shapes=None, meta_problem=None):
        """(step, meta) every rank resumes from ((None, None): start fresh). Raises CheckpointError on every rank
        when the checkpoint `latest` names cannot be used (unless `fallback` finds an earlier complete one).
        `meta_problem(meta)` names what else makes a checkpoint unusable for this run (None: nothing)."""
        try:
            latest = read_latest(self.root)
        except CheckpointError as exc:
            if not fallback:
                raise
            log(f"WARNING: --resume-fallback: {exc}; resuming from the newest complete checkpoint instead")
            latest = None
        steps = list_steps(self.root)
        fix = (
            "pass --resume-fallback to resume from the newest complete earlier checkpoint, or "
            "--load-checkpoint false to start over (a new run should use a new --checkpoint-path)"
        )
        if latest is None:
            if not steps:
                return None, None
            if not fallback:
                raise CheckpointError(
                    f"{self.root} holds checkpoint_{steps[-1]} but no `latest` file; write the "
                    f"step to resume into {os.path.join(self.root, 'latest')}, or {fix}"
                )
            candidates = list(reversed(steps))
        else:
            candidates = [latest] + ([s for s in reversed(steps) if s < latest] if fallback else [])
        first = None
        for step in candidates:
            meta, reason = self._validate(step, expected_meta, files_needed, expected_shapes, meta_problem)
            reason = self._agree(one_line(reason) if reason else None)
            if reason is None:
                if first is not None:
                    log(
                        f"WARNING: --resume-fallback: resuming from checkpoint {step}, because checkpoint "
                        f"{first[0]} cannot be used: {first[1]}"
                    )
                return step, meta
            first = first or (step, reason)
            if not fallback:
                break
        if fallback:
            raise CheckpointError(
                f"no usable checkpoint in {self.root} (newest problem: {first[1]}); fix it, or "
                f"pass --load-checkpoint false to start over"
            )
        raise CheckpointError(f"cannot resume from checkpoint {latest}: {first[1]}. Fix it, or {fix}")

    def read_tensors(self, step: int, meta: dict, suffix: str, owners: Collection[str]) -> dict[str, torch.Tensor]:
        """Tensors of files `*suffix` of checkpoint `step` whose name (before any "/") is in `owners`: a stage's
        weights, or its optimizer state ("<param>/<state>"), whatever layout wrote them. The logging rank draws a
        bar in MiB (utils.progress)."""
        folder = self.step_dir(step)
        wanted: dict[str, list[str]] = {}  # file -> the keys to read from it
        for name, keys in sorted(meta["tensors"].items()):
            mine = [k for k in keys if k.split("/", 1)[0] in owners]
            if name.endswith(suffix) and mine:
                wanted[name] = mine
        show = self.layout.is_logger
        total = 0
        if progress_enabled(show):  # the headers are read only for a bar's total
            for name, keys in wanted.items():
                sizes = _tensor_bytes(os.path.join(folder, name))
                total += sum(sizes[key] for key in keys)
        out: dict[str, torch.Tensor] = {}

        def read() -> Iterator[int]:
            for name, keys in wanted.items():
                with safe_open(os.path.join(folder, name), framework="pt") as f:
                    for key in keys:
                        out[key] = f.get_tensor(key)
                        yield out[key].numel() * out[key].element_size()

        kind = suffix.removeprefix("_").split(".")[0]  # "model" or "optimizer"
        _drain(read(), total, f"reading checkpoint {step} {kind}", show)
        return out

    def read_rng(self, step, rank):
        """The RNG states rank `rank` saved in checkpoint `step` ({"cpu": ..., ["cuda": ...]})."""
        return load_file(os.path.join(self.step_dir(step), rng_file(rank)))


def files_of(meta, owners):
    """The tensor files of a checkpoint holding anything of `owners` (tensor names)."""
    return [f for f, keys in meta.get("tensors", {}).items() if any(k.split("/", 1)[0] in owners for k in keys)]


def _copy_tokenizer(src, dst):
    """The tokenizer and generation files (modules.export's one list), so a checkpoint exports on its own."""
    from modules.export import copy_tokenizer_files

    os.makedirs(dst)
    copy_tokenizer_files(src, dst)
