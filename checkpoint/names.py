"""The names of the checkpoint format, used by every reader (the trainer, tools/, bench/). No imports: the flag checks
read them before torch loads. The layout of a checkpoint folder is described at the top of store.py."""

LATEST = "latest"
META = "meta.json"
DATA_STATE = "data_state.json"
TOKENIZER_DIR = "tokenizer"
MODEL_SUFFIX = "_model.safetensors"
OPTIMIZER_SUFFIX = "_optimizer.safetensors"
TMP_PREFIX = ".tmp_"  # every temporary name under --checkpoint-path starts with this


def step_dir_name(step):
    return f"checkpoint_{step}"


def stage_model_file(pp_rank):
    return f"prank_{pp_rank}{MODEL_SUFFIX}"


def stage_optimizer_file(pp_rank):
    return f"prank_{pp_rank}{OPTIMIZER_SUFFIX}"


def stage_optimizer_shard_file(pp_rank, dp_rank):
    """--dp-mode sharded: data-parallel rank dp_rank's pieces of stage pp_rank's optimizer state."""
    return f"prank_{pp_rank}_dp_{dp_rank}{OPTIMIZER_SUFFIX}"


def stage_state_file(pp_rank):
    return f"prank_{pp_rank}_state.json"


def rng_file(rank):
    return f"rank_{rank}_rng.safetensors"
