"""Asynchronous checkpoints: a snapshot of the state in host memory, written and committed by a background thread.

The training thread stalls only for the snapshot. Every tensor is copied into host buffers that are allocated and
pinned once, in a background thread after the run's first optimizer step (`prepare`: page-locking ~100 GB takes tens
of seconds), and reused by every checkpoint, so host memory holds one checkpoint's tensors, never more. Device
tensors are copied on a side stream, host tensors (offloaded optimizer state, CPU runs) by a thread, while the next
step's forward and backward run: the weights and optimizer state change only in the optimizer step, which waits for
those copies first (`CopiesInFlight.wait`). A background thread then waits for the copies and runs store.py's commit
(files, fsync, sha256, the cross-rank agreement through the gloo commit group, meta.json, rename, `latest`,
rotation). One write is in flight at a time: a periodic save that falls due during it is taken after the first
step that finds it done (TrainingCheckpoint.due; with --defer-checkpoints false it waits for it, as the final save
always does).

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
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, whichever thread registers it
# Bytes page-locked per cudaHostRegister call. The driver holds its lock through each call, so a training thread's
# CUDA call waits for the whole of it: while a 1.4B full fine-tune's ~20 GB arena was pinned in one call, on an H100,
# step 1's log line came 5-7 s after the step itself. Pieces of whole tensors, each starting on a page of its own,
# keep every copy inside one registration. Pinned back to back, the pieces still held up step 2 (4.4 s against
# 0.2 s): so each piece's pages are touched before it is registered (the first touch, which the kernel spends zeroing
# pages, then happens outside the driver's lock), and after each registration the background thread waits as long as
# it took, leaving the lock to the training thread at least half the time.
PIN_PIECE = 256 * 2**20


class CopiesInFlight:
    """The copies of one snapshot, still running: device tensors' on a side stream, host tensors' (offloaded optimizer
    state, CPU runs) in a thread; `wait` and `join` return once all are complete."""

    def __init__(self, event):
        self.event = event  # recorded after the last device copy; None without device tensors
        self.thread = None  # copying the host tensors, if there are any
        self.error = None  # what the host copies raised, raised again by join

    def wait(self) -> float:
        """The training thread, before the optimizer step: returns the seconds it waited."""
        started = time.perf_counter()
        self.join()
        return time.perf_counter() - started

    def join(self):
        if self.thread is not None:
            self.thread.join()
        if self.event is not None:
            self.event.synchronize()
        if self.error is not None:
            raise self.error


class HostBuffers:
    """One host arena carved into a contiguous buffer per tensor. Reused while the tensors keep their names, dtypes
    and shapes (every checkpoint of a run); a snapshot returns views of it, valid until the next snapshot."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"  # page-locked (CUDA): device-to-host copies run asynchronously at full speed
        self.stream = None  # the side stream of the device-to-host copies, made at the first snapshot
        self.signature = None
        self.arena = None
        self.pinned = []  # addresses of the arena's registered pieces
        self.views = {}
        self.preparing = None  # the thread allocating the arena ahead of the first snapshot

    @staticmethod
    def plan(groups: dict) -> tuple[list, int, list[tuple[int, int]]]:
        """[(group, key, dtype, shape, offset)], the arena's size and its pieces for `groups` ({group: {key:
        tensor}}). A tensor that follows PIN_PIECE bytes or more since the last piece's start begins a piece, on a page
        of its own: pieces are [start, end) byte ranges of whole tensors, each pinned by a call of its own."""
        entries, offset, starts = [], 0, [0]
        for group, tensors in groups.items():
            for key, tensor in tensors.items():
                if offset - starts[-1] >= PIN_PIECE:
                    offset = -(-offset // PAGE) * PAGE
                    starts.append(offset)
                entries.append((group, key, tensor.dtype, tuple(tensor.shape), offset))
                offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        pieces = [(a, b) for a, b in zip(starts, [*starts[1:], offset]) if b > a]
        return entries, offset, pieces

    def needs(self, groups: dict) -> int:
        """Bytes a snapshot of `groups` would newly allocate (0 when the arena already fits them)."""
        self._prepared()
        entries, size, _ = self.plan(groups)
        return 0 if entries == self.signature else size

    def prepare(self, groups: dict):
        """Allocate (and pin) the arena for snapshots of `groups` in a background thread; the next `copy` waits
        for it."""
        entries, size, pieces = self.plan(groups)
        if entries == self.signature or self.preparing is not None:
            return

        def allocate():
            if self.pin:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0
            self._allocate(entries, size, pieces, background=True)

        self.preparing = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self.preparing.start()

    def copy(self, groups: dict) -> tuple[dict, CopiesInFlight]:
        """{group: {key: host copy}} of `groups`, and the copies still in flight: device tensors' on a side stream,
        after the work already queued; host tensors' in a thread (torch's copies release the GIL), so that neither
        holds up the training thread."""
        self._prepared()
        entries, size, pieces = self.plan(groups)
        if entries != self.signature:
            self._allocate(entries, size, pieces)
        out = {group: {key: self.views[(group, key)] for key in tensors} for group, tensors in groups.items()}
        pairs = [(out[g][k], t.detach()) for g, tensors in groups.items() for k, t in tensors.items()]
        on_device = [(view, tensor) for view, tensor in pairs if tensor.is_cuda]
        on_host = [(view, tensor) for view, tensor in pairs if not tensor.is_cuda]
        event = None
        if on_device:
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # copy the values after the update
            with torch.cuda.stream(self.stream):
                for view, tensor in on_device:
                    view.copy_(tensor, non_blocking=True)
                    tensor.record_stream(self.stream)  # a temporary's memory is not reused before its copy ran
            event = torch.cuda.Event()
            event.record(self.stream)
        copies = CopiesInFlight(event)
        if on_host:

            def copy_host():
                try:
                    for view, tensor in on_host:
                        view.copy_(tensor)
                except BaseException as exc:  # noqa: BLE001 - raised by join, on the thread that needs the copies
                    copies.error = exc

            copies.thread = threading.Thread(target=copy_host, name="checkpoint-host-copies", daemon=True)
            copies.thread.start()
        return out, copies

    def _prepared(self):
        """The arena `prepare` is allocating is there (its thread done)."""
        if self.preparing is not None:
            self.preparing.join()
            self.preparing = None

    def _allocate(self, entries, size, pieces, background: bool = False):
        self.release()
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE
        arena = raw[start : start + size]
        self.arena = arena
        if self.pin and size:
            # In place, by cudaHostRegister: torch's pinned allocator rounds each block up to a power of two, which
            # would take up to twice a 90 GB snapshot.
            cudart = torch.cuda.cudart()
            for begin, end in pieces:
                arena[begin:end].fill_(0)  # first touch, outside the driver's lock (PIN_PIECE)
                started = time.perf_counter()
                if int(cudart.cudaHostRegister(arena.data_ptr() + begin, end - begin, HOST_REGISTER_PORTABLE)) != 0:
                    self.release_pins()
                    self.pin = False  # unpinned still works, with slower, synchronous copies
                    break
                self.pinned.append(arena.data_ptr() + begin)
                if background:  # the training thread's turn at the driver
                    time.sleep(time.perf_counter() - started)
        self.views = {}
        for group, key, dtype, shape, offset in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            self.views[(group, key)] = arena[offset : offset + nbytes].view(dtype).view(shape)
        self.signature = entries

    def release_pins(self):
        for address in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(address)
        self.pinned = []

    def release(self):
        self.release_pins()
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
