"""--offload-optimizer cpu: the optimizer update on the host, its device<->host copies overlapped chunk by chunk.

The units (whole parameters, or this rank's pieces under --dp-mode sharded) are stepped in the chunks of
StageOptimizer (at most MASTER_GRAD_CHUNK_BYTES of fp32 gradients each). For chunk k:
  1. its summed gradients go device -> host in the model's dtype (bf16/fp16: half the bytes of fp32) into a pinned
     staging buffer, on a side CUDA stream; the copy of chunk k+1 is issued before the host works on chunk k, so it
     runs while the host steps;
  2. the host widens them to fp32 (torch's multi-threaded copy) into the masters' .grad and runs the fused AdamW step
     on the chunk;
  3. the updated fp32 masters are rounded to the model's dtype on the host into a second pinned buffer, which a
     second side stream copies into the parameters while the host steps chunk k+1.
Two buffers of each kind alternate between chunks; they and one fp32 gradient buffer are allocated once. The step
ends with one synchronize, after which the parameters hold the new weights. Without CUDA (the tests) the same code
runs with plain copies. Every value is the one the device path computes: bf16/fp16 -> fp32 is exact, AdamW is the
same fused kernel, and fp32 -> bf16/fp16 rounds to nearest even on either side.
"""

import contextlib
import os
import time

import torch

from utils.host import cores_per_rank

ALIGN = 64  # bytes: every unit's view in a staging buffer starts aligned for any dtype


def _aligned(nbytes):
    return -(-nbytes // ALIGN) * ALIGN


def host_threads(local_ranks):
    """Intra-op threads for the host step: the cores this process may use, shared by the ranks on this host, unless
    OMP_NUM_THREADS says otherwise. torchrun sets OMP_NUM_THREADS=1 for every worker when it starts several per
    host and the user did not set it; a worker cannot tell that value from a user's, so 1 with several local ranks
    is taken as torchrun's default (any other value is the user's and is kept)."""
    given = os.environ.get("OMP_NUM_THREADS")
    if given and not (given == "1" and local_ranks > 1):
        return torch.get_num_threads()
    return cores_per_rank()


class HostStep:
    """Staging buffers, side streams and the chunked update of one StageOptimizer's offloaded units."""

    def __init__(self, masters, dtypes, chunks, device):
        self.chunks = chunks
        self.cuda = device.type == "cuda"
        self.fetch_stream = torch.cuda.Stream(device) if self.cuda else None  # device -> host
        self.put_stream = torch.cuda.Stream(device) if self.cuda else None  # host -> device
        self.dtypes = dtypes
        # Where each unit lies in the staging buffers (bytes) and in the fp32 gradient buffer (elements).
        self.byte_at, self.elem_at = [0] * len(masters), [0] * len(masters)
        stage_bytes = wide_elems = 0
        for chunk in chunks:
            nbytes = elems = 0
            for k in chunk:
                self.byte_at[k], self.elem_at[k] = nbytes, elems
                nbytes += _aligned(masters[k].numel() * dtypes[k].itemsize)
                elems += _aligned(masters[k].numel() * 4) // 4
            stage_bytes, wide_elems = max(stage_bytes, nbytes), max(wide_elems, elems)
        narrow = any(dt != torch.float32 for dt in dtypes)  # fp32 units skip the widening and the rounding
        self.grads_in = [self._pinned(stage_bytes) for _ in range(2)]
        self.weights_out = [self._pinned(stage_bytes if narrow else 0) for _ in range(2)]
        self.wide = torch.empty(wide_elems if narrow else 0, dtype=torch.float32)
        self.seconds = self.wait_seconds = 0.0  # of the last step: all of it, and the host blocked on copies

    def _pinned(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _view(self, buffer, k, numel):
        return buffer[self.byte_at[k] : self.byte_at[k] + numel * self.dtypes[k].itemsize].view(self.dtypes[k])

    def _fetch(self, c, grads):
        """Issue the device -> host copy of chunk c's gradients into its staging buffer; returns its event."""
        buffer = self.grads_in[c % 2]
        with torch.cuda.stream(self.fetch_stream) if self.cuda else contextlib.nullcontext():
            for k in self.chunks[c]:
                g = grads[k]
                self._view(buffer, k, g.numel()).copy_(g.reshape(-1), non_blocking=self.cuda)
            return self._record(self.fetch_stream)

    def _record(self, stream):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _wait(self, event):
        if event is not None:
            t = time.perf_counter()
            event.synchronize()
            self.wait_seconds += time.perf_counter() - t

    @torch.no_grad()
    def run(self, grads, masters, targets, step_chunk):
        """One update: `grads[k]` (device, model dtype) -> `masters[k].grad`; `step_chunk(indices)` steps the
        masters of a chunk on the host; then `targets[k]` (the device parameter or its piece) take the new
        masters."""
        started = time.perf_counter()
        self.wait_seconds = 0.0
        if self.cuda:  # the side streams start after the backward (and reduction) queued so far
            main = torch.cuda.current_stream()
            self.fetch_stream.wait_stream(main)
            self.put_stream.wait_stream(main)
        fetched, put = {0: self._fetch(0, grads)}, {}
        for c, chunk in enumerate(self.chunks):
            if c + 1 < len(self.chunks):
                fetched[c + 1] = self._fetch(c + 1, grads)  # runs while this chunk steps
            self._wait(fetched.pop(c))
            for k in chunk:
                staged = self._view(self.grads_in[c % 2], k, masters[k].numel()).view(masters[k].shape)
                if self.dtypes[k] == torch.float32:
                    masters[k].grad = staged
                else:
                    wide = self.wide[self.elem_at[k] : self.elem_at[k] + masters[k].numel()]
                    masters[k].grad = wide.view(masters[k].shape).copy_(staged)
            step_chunk(chunk)
            for k in chunk:
                masters[k].grad = None
            self._wait(put.pop(c - 2, None))  # the rounding buffer is free again once chunk c-2 has landed
            out = self.weights_out[c % 2]
            with torch.cuda.stream(self.put_stream) if self.cuda else contextlib.nullcontext():
                for k in chunk:
                    source = masters[k].reshape(-1)
                    if self.dtypes[k] != torch.float32:
                        source = self._view(out, k, source.numel()).copy_(source)
                    targets[k].reshape(-1).copy_(source, non_blocking=self.cuda)
                put[c] = self._record(self.put_stream)
        if self.cuda:  # the step's one synchronize: the parameters hold the new weights, the buffers are free
            self.put_stream.synchronize()
            torch.cuda.current_stream().wait_stream(self.put_stream)
        self.seconds = time.perf_counter() - started
