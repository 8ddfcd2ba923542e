#!/usr/bin/env bash
# LoRA fine-tuning of GPT-NeoX-20B into a chat model on ONE 80 GB GPU (QUANTIZE_BASE=nf4: QLoRA, about 24 GB).
# The base stays frozen in bf16 (or NF4); only rank-16 adapters on query_key_value train, with fp32 master copies.
# Export the result as a peft adapter (python tools/convert_to_hf.py --checkpoint-path CHECKPOINT_PATH --output DIR)
# or merged into the base (add --merge-lora). Copy this file and edit the variables below, or set them in the
# environment; EXTRA_ARGS="..." is appended to the flags (several GPUs: NUM_GPUS=2 runs a pipeline of 2 stages).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)

BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b"}  # HF or layer-sharded dir
DATASETS=${DATASETS:-"${DIR}/data/OIG/files"}                  # a folder of .jsonl / .parquet files
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/GPT-Neo-XT-Chat-Base-20B-lora"}
TRAINER=${TRAINER:-"${DIR}/dist_lm_pretrain_and_finetune.py"}
TOTAL_STEPS=${FINETUNE_TOTAL_STEPS:-2000}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-100}
QUANTIZE_BASE=${QUANTIZE_BASE:-none}                            # none | nf4 | int8
NUM_GPUS=${NUM_GPUS:-1}                                         # = pipeline stages (one per GPU)
MASTER_PORT=${MASTER_PORT:-7033}
export WANDB_NAME=${WANDB_NAME:-GPT-NeoXT-Chat-Base-20B-lora}

ARGS=(
  --model-name "${BASE_MODEL}"
  --tokenizer-name "${BASE_MODEL}"
  --task-name "${DATASETS}"
  --checkpoint-path "${CHECKPOINT_PATH}"
  --total-steps "${TOTAL_STEPS}" --warmup-steps 20
  --checkpoint-steps "${CHECKPOINT_STEPS}"
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules query_key_value
  --quantize-base "${QUANTIZE_BASE}"
  --lr 2e-4 --seq-length 2048 --batch-size 16 --micro-batch-size 1 --gradient-accumulate-step 1
  --bf16 --activation-checkpointing selective
  --pipeline-group-size "${NUM_GPUS}" --pp-mode 1f1b
)
# Unquoted on purpose: EXTRA_ARGS holds several flags, split at spaces (so no spaces inside its values).
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

exec "${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node "${NUM_GPUS}" --master_port "${MASTER_PORT}" \
  "${TRAINER}" "${ARGS[@]}"
