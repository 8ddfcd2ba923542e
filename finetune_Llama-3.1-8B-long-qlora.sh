#!/usr/bin/env bash
# Long-context QLoRA of Llama-3.1-8B (or any family here: set BASE_MODEL) on ONE 80 GB GPU, 64k-token windows by
# default (SEQ_LENGTH). What makes a long window fit: the base in NF4 (QUANTIZE_BASE), every block recomputed in the
# backward (--activation-checkpointing full) with the inputs it keeps moved to host memory (--activation-offload
# cpu), and the LM head applied in chunks inside the loss so that no window's logits exist (--chunked-loss on).
# Documents are packed into the windows and attend only within themselves; chat records go through the tokenizer's
# chat template. The start of the run prints its memory plan. Rope scaling comes from the model's config
# (Llama 3.1: 128k positions). Copy this file and edit the variables below, or set them in the environment;
# EXTRA_ARGS="..." is appended to the flags (NUM_GPUS=2 splits the layers over a pipeline of 2 stages).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)

BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/Llama-3.1-8B-Instruct"}  # a Hugging Face model directory
DATASETS=${DATASETS:-"${DIR}/data/long"}                            # .jsonl / .parquet files of chat or text records
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/Llama-3.1-8B-long-qlora"}
TRAINER=${TRAINER:-"${DIR}/dist_lm_pretrain_and_finetune.py"}
TOTAL_STEPS=${FINETUNE_TOTAL_STEPS:-500}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-50}
SEQ_LENGTH=${SEQ_LENGTH:-65536}                                     # tokens per window
QUANTIZE_BASE=${QUANTIZE_BASE:-nf4}                                 # nf4 | int8 | none (LoRA on a bf16 base)
TILED_MLP=${TILED_MLP:-off}                                         # on: the MLPs 8k tokens at a time (3 GB less
                                                                    # at 32k on an H100, 9% slower)
COMPILE=${COMPILE:-1}                                               # 1: torch.compile each block (1.20x at 32k on
                                                                    # an H100; the first step compiles, ~30 s)
NUM_GPUS=${NUM_GPUS:-1}                                             # = pipeline stages (one per GPU)
MASTER_PORT=${MASTER_PORT:-7035}
export WANDB_NAME=${WANDB_NAME:-Llama-3.1-8B-long-qlora}

ARGS=(
  --model-name "${BASE_MODEL}"
  --tokenizer-name "${BASE_MODEL}"
  --task-name "${DATASETS}"
  --checkpoint-path "${CHECKPOINT_PATH}"
  --total-steps "${TOTAL_STEPS}" --warmup-steps 10
  --checkpoint-steps "${CHECKPOINT_STEPS}"
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules all-linear
  --quantize-base "${QUANTIZE_BASE}"
  --lr 1e-4 --seq-length "${SEQ_LENGTH}" --batch-size 1 --micro-batch-size 1 --gradient-accumulate-step 8
  --bf16 --activation-checkpointing full --activation-offload cpu --chunked-loss on --tiled-mlp "${TILED_MLP}"
  --pipeline-group-size "${NUM_GPUS}" --pp-mode 1f1b
)
if [[ "${COMPILE}" == 1 ]]; then ARGS+=(--compile); fi
# Unquoted on purpose: EXTRA_ARGS holds several flags, split at spaces (so no spaces inside its values).
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

exec "${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node "${NUM_GPUS}" --master_port "${MASTER_PORT}" \
  "${TRAINER}" "${ARGS[@]}"
