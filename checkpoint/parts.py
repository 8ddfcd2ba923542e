"""The protocol between a run's stateful parts and this room: each part gives its state and takes it back.

    parts = {"optimizer": optimizer, "data": stream, "rng": RngState(device), "metrics": logger}
    TrainingCheckpoint(cfg, layout, run, log).resume(TrainState(..., parts=parts))

A part's `state_dict()` is what it needs to continue exactly (JSON values, or tensors for the RNG); its
`load_state_dict(state)` continues from it. Which file holds each part, and whether a part is restored at all (the
RNG only in the same layout, the data position as --resume-data says), is checkpoint/training_state.py's policy.
The trained tensors (weights, fp32 masters, optimizer moments) are not parts: their files are cut by layout and
reconciled between layouts and precisions there.
"""

from __future__ import annotations

from typing import Protocol

import torch

# The parts every run has, by name; "data" only on ranks that read the data stream.
PART_NAMES = ("optimizer", "data", "rng", "metrics")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RngState:
    """This process's torch generators (dropout draws from them): the CPU one and, on a GPU, its device's."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """New CPU tensors: nothing to copy before a background write."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
