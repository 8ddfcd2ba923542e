"""The check a fresh run makes of --checkpoint-path before anything starts (imports neither torch nor the rest of
this room, so that a refusal costs no start-up)."""

import os

from checkpoint.names import LATEST, step_dir_name
from config import ArgumentError, CheckpointConfig


def refuse_replacing(cfg: CheckpointConfig) -> None:
    """A run that does not resume (--load-checkpoint false) would save over another run's checkpoints and rotate
    them away: refuse it while the folder holds any."""
    if cfg.resume or not os.path.isdir(cfg.path):
        return
    used = sorted(n for n in os.listdir(cfg.path) if n == LATEST or n.startswith(step_dir_name("")))
    if used:
        raise ArgumentError(
            f"--checkpoint-path {cfg.path} holds another run's checkpoints ({', '.join(used[:3])}) and "
            f"--load-checkpoint false would replace them; give a new --checkpoint-path, resume with "
            f"--load-checkpoint true, or delete them"
        )
