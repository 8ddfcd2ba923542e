"""Training checkpoints, in one room: names.py (the file names of the format), store.py (the bytes on disk: atomic
saves, checks, rotation, reading any layout's files), snapshot.py (host copies and the background writer of
--async-checkpoint), training_state.py (what a checkpoint holds and how a run is restored from it)."""
