"""Asynchronous checkpoints: a snapshot of the state in host memory, written and committed by a background thread.

The training thread stalls only for the snapshot: every tensor is copied into host buffers (pinned where CUDA is
available, non-blocking copies and one synchronize at the end) that are allocated at the first checkpoint and reused
by every later one, so host memory holds one checkpoint's tensors, never more. A background thread then runs
store.py's commit (files, fsync, sha256, the cross-rank agreement through the gloo commit group, meta.json, rename,
`latest`, rotation). One write is in flight at a time: the next snapshot first waits for it.

A write's outcome is the same on every rank (the commit agrees through the commit group). The training thread learns
it where every rank is at the same point: after each step (`TrainingCheckpoint.poll`), the next snapshot, or the end
of the run.
"""

import threading
import time

import torch

from utils.host import host_memory_available, local_ranks

ALIGN = 64  # bytes: every tensor's offset in the arena, so any dtype can view it
PAGE = 4096


class HostBuffers:
    """One host arena carved into a contiguous buffer per tensor. Reused while the tensors keep their names, dtypes
    and shapes (every checkpoint of a run); a snapshot returns views of it, valid until the next snapshot."""

    def __init__(self, pin: bool):
        self.pin = pin  # page-lock the arena (CUDA): device-to-host copies then run asynchronously at full speed
        self.signature = None
        self.arena = None
        self.views = {}

    @staticmethod
    def plan(groups: dict) -> tuple[list, int]:
        """[(group, key, dtype, shape, offset)] and the arena's size for `groups` ({group: {key: tensor}})."""
        entries, offset = [], 0
        for group, tensors in groups.items():
            for key, tensor in tensors.items():
                entries.append((group, key, tensor.dtype, tuple(tensor.shape), offset))
                offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        return entries, offset

    def needs(self, groups: dict) -> int:
        """Bytes a snapshot of `groups` would newly allocate (0 when the arena already fits them)."""
        entries, size = self.plan(groups)
        return 0 if entries == self.signature else size

    def copy(self, groups: dict) -> dict:
        """{group: {key: host copy}} of `groups`, complete when this returns."""
        entries, size = self.plan(groups)
        if entries != self.signature:
            self._allocate(entries, size)
        out = {group: {} for group in groups}
        cuda = False
        for group, tensors in groups.items():
            for key, tensor in tensors.items():
                view = self.views[(group, key)]
                view.copy_(tensor.detach(), non_blocking=True)
                cuda = cuda or tensor.is_cuda
                out[group][key] = view
        if cuda:
            torch.cuda.synchronize()  # the copies are complete before training may change the tensors again
        return out

    def _allocate(self, entries, size):
        self.release()
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE
        arena = raw[start : start + size]
        if self.pin and size:
            # In place, by cudaHostRegister: torch's pinned allocator rounds each block up to a power of two, which
            # would take up to twice a 90 GB snapshot.
            if int(torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), size, 0)) != 0:
                self.pin = False  # unpinned still works, with slower, synchronous copies
        self.arena = arena
        self.views = {}
        for group, key, dtype, shape, offset in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            self.views[(group, key)] = arena[offset : offset + nbytes].view(dtype).view(shape)
        self.signature = entries

    def release(self):
        if self.arena is not None and self.pin and self.arena.numel():
            torch.cuda.cudart().cudaHostUnregister(self.arena.data_ptr())
        self.arena, self.views, self.signature = None, {}, None


def snapshot_fits(nbytes: int) -> tuple[bool, str]:
    """Whether this host's available memory holds `nbytes` of new snapshot buffers for every rank on it, and a
    phrase naming the sizes."""
    if nbytes == 0:
        return True, ""
    available = host_memory_available()
    ranks_here = local_ranks()
    sizes = (
        f"{nbytes / 1e9:.1f} GB per rank x {ranks_here} rank(s) on this host, "
        f"{(available or 0) / 1e9:.1f} GB available (MemAvailable)"
    )
    # a tenth kept back for everything else the processes and the page cache need
    return available is None or nbytes * ranks_here <= 0.9 * available, sizes


class BackgroundWrite:
    """One checkpoint write: `run` in a background thread (or inline: `background=False`); its outcome (None, or the
    exception it raised) is kept for the training thread, which raises it where every rank checks."""

    def __init__(self, step: int, run, stall_s: float, background: bool = True):
        self.step = step
        self.stall_s = stall_s
        self.write_s = None
        self.error = None
        self._run = run
        self.thread = None
        if background:
            self.thread = threading.Thread(target=self._target, name=f"checkpoint-{step}", daemon=True)
            self.thread.start()
        else:
            self._target()

    def _target(self):
        started = time.perf_counter()
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - kept for the training thread, raised there
            self.error = exc
        self.write_s = time.perf_counter() - started

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def join(self):
        if self.thread is not None:
            self.thread.join()
