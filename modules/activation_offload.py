"""--activation-offload cpu: the inputs that activation checkpointing keeps for each block's backward live in pinned
host memory instead of on the GPU.

With checkpointing, a block's forward keeps only its input (tokens x hidden, in the model dtype) until its backward
recomputes it; over a long window and many blocks these inputs are what is left of the activations (Llama-3-8B at
128k tokens: 32 x 1 GB). Offloading moves each one out as its block's forward ends: the copy runs on a side stream
after the compute stream has written it, into pinned memory from torch's caching host allocator, and the GPU copy is
released to the allocator once the side stream has read it. In the backward, fetching a block's input also starts
fetching the input of the block before it on the side stream, so the next recomputation rarely waits for the copy.

On a GPU only tensors of at least MIN_BYTES are moved (small rotary tables stay); each tensor is moved once per stage
forward even when several blocks save it. Values are copied, never changed: training is bit-identical with and
without it. On a CPU run every saved input is copied within host memory: nothing is gained, the path is exercised.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

MIN_BYTES = 1 << 20


class _Offloaded:
    """One tensor in host memory, the events that order its copies against the compute stream, and the tensor
    moved out before it (whose backward comes next)."""

    __slots__ = ("host", "device", "copied", "fetched", "on_device", "previous")

    def __init__(self, host, device, copied, previous):
        self.host, self.device, self.copied, self.previous = host, device, copied, previous
        self.fetched = self.on_device = None


class ActivationOffload:
    """Moves the tensors saved inside `with offload.hooks(state):` to host memory, `state = new_pass()` once per
    stage forward."""

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:  # tensors report cuda:N, which never equals "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.moved_bytes = 0  # since the last new_pass(), for the log and the tests

    def new_pass(self) -> dict:
        """The state one stage forward shares between its blocks: what was moved, and the last one moved."""
        self.moved_bytes = 0
        return {"seen": {}, "last": None}

    @contextlib.contextmanager
    def hooks(self, state: dict):
        def pack(tensor):
            if tensor.device != self.device or (self.stream is not None and tensor.nbytes < MIN_BYTES):
                return tensor
            # The same tensor saved again (by the next block) shares its copy. Its address alone does not say so:
            # a block's input is freed once moved out, and a later block's input of the same size may take its
            # place, so the entry also holds a weak reference to the tensor it copied, alive only while that is.
            key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
            seen = state["seen"].get(key)
            if seen is None or seen[0]() is not tensor:
                state["last"] = self._move_out(tensor, state["last"])
                state["seen"][key] = seen = (weakref.ref(tensor), state["last"])
                self.moved_bytes += tensor.nbytes
            return seen[1]

        def unpack(packed):
            if not isinstance(packed, _Offloaded):
                return packed
            self._fetch(packed)
            if packed.previous is not None:  # the block before runs its backward next: start its copy now
                self._fetch(packed.previous)
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_event(packed.fetched)
            # The backward holds the copy from here on, for as long as it needs it; kept here too, every block's
            # input would be back on the device by the end of the backward (a tensor unpacked twice is fetched twice)
            tensor, packed.on_device = packed.on_device, None
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _move_out(self, tensor: torch.Tensor, previous: _Offloaded | None) -> _Offloaded:
        if self.stream is None:
            return _Offloaded(tensor.detach().clone(), tensor.device, None, previous)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the compute stream wrote it
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is reused only after the side stream has read it
        return _Offloaded(host, tensor.device, copied, previous)

    def _fetch(self, packed: _Offloaded) -> None:
        if packed.on_device is not None:
            return
        if self.stream is None:
            packed.on_device = packed.host.clone()
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(packed.copied)
            packed.on_device = packed.host.to(packed.device, non_blocking=True)
            packed.fetched = torch.cuda.Event()
            packed.fetched.record(self.stream)
        packed.on_device.record_stream(torch.cuda.current_stream(self.device))
