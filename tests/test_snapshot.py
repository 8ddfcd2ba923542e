"""The asynchronous checkpoint's host snapshot (checkpoint/snapshot.py): buffers allocated once, ahead of the first
snapshot; a snapshot holds the values at the moment it was taken, whatever training does to the tensors afterwards.

On a GPU the device copies run on a side stream after the work already queued, and the optimizer step waits for them
(`CopiesInFlight.wait`); those tests run where CUDA is (the GPU benchmark machine) and are skipped here.
"""

import threading
import types

import pytest
import torch

from checkpoint import snapshot
from checkpoint.snapshot import ALIGN, PAGE, BackgroundWrite, HostBuffers
from checkpoint.training_state import TrainingCheckpoint
from config import CheckpointConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copies need a CUDA device")


def cuda(test):
    return pytest.mark.gpu(needs_cuda(test))


def state(device="cpu"):
    return {
        "stage": {"w": torch.arange(10_000, dtype=torch.float32, device=device).reshape(100, 100)},
        "optimizer": {
            "w/exp_avg": torch.full((100, 100), 0.5, device=device),
            "w/step": torch.tensor(3.0, device=device),
            "b/exp_avg": torch.ones(7, dtype=torch.bfloat16, device=device),
        },
    }


def test_prepared_buffers_are_the_ones_every_snapshot_reuses():
    buffers = HostBuffers(torch.device("cpu"))
    groups = state()
    assert buffers.needs(groups) > 0
    buffers.prepare(groups)
    assert buffers.needs(groups) == 0  # waits for the preparing thread: nothing more to allocate
    host, _ = buffers.copy(groups)
    arena = buffers.arena.data_ptr()
    again, _ = buffers.copy(state())
    assert buffers.arena.data_ptr() == arena and again["stage"]["w"].data_ptr() == host["stage"]["w"].data_ptr()
    # another shape: new buffers
    grown = state()
    grown["optimizer"]["extra"] = torch.zeros(3)
    assert buffers.needs(grown) > 0


def test_a_snapshot_keeps_the_values_of_its_moment():
    buffers = HostBuffers(torch.device("cpu"))
    groups = state()
    host, copies = buffers.copy(groups)
    copies.wait()
    for tensors in groups.values():
        for tensor in tensors.values():
            tensor.add_(1)  # the next optimizer step
    fresh = state()
    for name, tensors in fresh.items():
        for key, expected in tensors.items():
            assert host[name][key].dtype == expected.dtype and torch.equal(host[name][key], expected), key


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister, recorded; registering fails from call `fail_at` on."""

    def __init__(self, fail_at=None):
        self.registered, self.calls, self.fail_at = {}, 0, fail_at

    def cudaHostRegister(self, address, size, flags):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            return 1
        assert address % PAGE == 0, "a piece starts on a page of its own"
        assert all(address + size <= a or a + n <= address for a, n in self.registered.items()), "pieces overlap"
        self.registered[address] = size
        return 0

    def cudaHostUnregister(self, address):
        del self.registered[address]
        return 0


def many_tensors():
    return {"stage": {f"t{i}": torch.full((1000 + 37 * i,), float(i)) for i in range(12)}}


def test_the_arena_is_pinned_in_pieces_of_whole_tensors(monkeypatch):
    """Each cudaHostRegister call holds the driver's lock against the training thread's CUDA calls: pieces of about
    PIN_PIECE bytes, page-aligned, never splitting a tensor (a copy must lie inside one registration)."""
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(snapshot, "PIN_PIECE", 3 * PAGE)
    buffers = HostBuffers(torch.device("cuda"))  # pins; the tensors stay on the host (copied by a thread)
    groups = many_tensors()
    host, copies = buffers.copy(groups)
    copies.wait()
    assert len(fake.registered) > 2
    arena = buffers.arena.data_ptr()
    assert sum(fake.registered.values()) == buffers.arena.numel() and min(fake.registered) == arena
    for key, tensor in groups["stage"].items():
        view = host["stage"][key]
        begin, end = view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()
        assert [a for a, n in fake.registered.items() if a <= begin and end <= a + n], f"{key} spans two pieces"
        assert torch.equal(view, tensor)
    for size in fake.registered.values():
        assert size <= 3 * PAGE + 4 * (1000 + 37 * 11) + ALIGN  # closed by the tensor that passes PIN_PIECE
    buffers.release()
    assert fake.registered == {}


def test_a_piece_that_cannot_be_pinned_leaves_the_arena_unpinned(monkeypatch):
    fake = FakeCudart(fail_at=3)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(snapshot, "PIN_PIECE", 3 * PAGE)
    buffers = HostBuffers(torch.device("cuda"))
    groups = many_tensors()
    host, copies = buffers.copy(groups)
    copies.wait()
    assert fake.registered == {} and not buffers.pin  # the two pinned pieces were let go again
    assert all(torch.equal(host["stage"][k], t) for k, t in groups["stage"].items())


def test_a_save_due_during_the_previous_write_is_taken_after_the_step_that_finds_it_done(tmp_path):
    """Training never waits for a background write: the save due at step 4 while checkpoint 2 is still being written
    is owed, then taken after the first step at which the write is over (agreed by every rank in `poll`); a due step
    that passes meanwhile does not move it. The final step is the trainer's own save."""
    lines = []
    cfg = CheckpointConfig(path=str(tmp_path), every_steps=2, async_write=True)
    checkpoint = TrainingCheckpoint(cfg, types.SimpleNamespace(device=torch.device("cpu")), None, lines.append)
    assert not checkpoint.due(1, 10) and checkpoint.due(2, 10)  # nothing in flight: due on time
    checkpoint.owed = None  # as save(2) leaves it
    writing = threading.Event()
    checkpoint.pending = BackgroundWrite(2, writing.wait, stall_s=0.0)
    assert not checkpoint.due(3, 10) and not lines
    assert not checkpoint.due(4, 10) and not checkpoint.due(5, 10) and not checkpoint.due(6, 10)
    assert lines == [
        "checkpoint 4 is due while checkpoint 2 is still being written; it is taken after the first step that "
        "finds that write done"
    ]
    writing.set()
    checkpoint.pending.join()
    assert not checkpoint.due(7, 10)  # done here, but this rank has not heard that every rank is done
    checkpoint._finish_pending()  # what poll does once every rank's write is done
    assert checkpoint.due(7, 10) and checkpoint.owed == 4  # save(7) records it as due at step 4
    checkpoint.owed = None
    checkpoint.pending = BackgroundWrite(7, writing.wait, stall_s=0.0)  # already set: over at once
    assert not checkpoint.due(8, 10)  # owed, the write not reported done yet
    checkpoint._finish_pending()
    assert not checkpoint.due(10, 10)  # the last step: the trainer saves it whatever is owed

    # --defer-checkpoints false: due at its step; save() waits for the write in flight
    cfg = CheckpointConfig(path=str(tmp_path), every_steps=2, async_write=True, defer=False)
    checkpoint = TrainingCheckpoint(cfg, types.SimpleNamespace(device=torch.device("cpu")), None, lines.append)
    writing = threading.Event()
    checkpoint.pending = BackgroundWrite(2, writing.wait, stall_s=0.0)
    assert not checkpoint.due(3, 10) and checkpoint.due(4, 10) and checkpoint.due(5, 10)  # 4 still owed: no save ran
    writing.set()


@cuda
def test_device_copies_take_the_queued_values_and_the_update_waits_for_them():
    device = torch.device("cuda")
    buffers = HostBuffers(device)
    weights = torch.zeros(64 << 20, dtype=torch.int64, device=device)  # 512 MB: copies take a while
    for _ in range(20):
        weights.add_(1)  # queued before the snapshot: the snapshot must see all of it
    temporary = weights * 2  # freed right after the snapshot: its memory must not be reused before its copy ran
    host, copies = buffers.copy({"stage": {"w": weights, "t": temporary}})
    del temporary
    garbage = torch.full((64 << 20,), -1, dtype=torch.int64, device=device)  # may take the temporary's memory
    copies.wait()  # what before_update does
    weights.add_(1000)  # the optimizer step
    copies.join()
    torch.cuda.synchronize()
    assert bool((host["stage"]["w"] == 20).all()) and bool((host["stage"]["t"] == 40).all())
    assert bool((garbage == -1).all())
