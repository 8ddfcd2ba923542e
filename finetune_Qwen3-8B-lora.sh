#!/usr/bin/env bash
# LoRA fine-tuning of Qwen3-8B (or any Qwen2.5 / Qwen3 / Llama 3 / Mistral / Gemma / Phi-3 checkpoint: set
# BASE_MODEL) into a chat model on ONE 80 GB GPU; QUANTIZE_BASE=nf4 for QLoRA on a 24 GB card. Chat records are
# rendered with the tokenizer's own chat template (ChatML for Qwen) and only the assistant turns take loss.
# Rank-16 adapters on every linear of the blocks (all-linear) train with fp32 master copies; the base stays frozen
# in bf16 (or NF4). Export as a peft adapter (python tools/convert_to_hf.py --checkpoint-path CHECKPOINT_PATH
# --output DIR), or merged into the base (add --merge-lora). Copy this file and edit the variables below, or set
# them in the environment; EXTRA_ARGS="..." is appended to the flags (several GPUs: NUM_GPUS=2 runs a pipeline of 2
# stages).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)

BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/Qwen3-8B"}              # a Hugging Face model directory
DATASETS=${DATASETS:-"${DIR}/data/chat"}                           # .jsonl / .parquet files of chat records
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/Qwen3-8B-lora"}
TRAINER=${TRAINER:-"${DIR}/dist_lm_pretrain_and_finetune.py"}
TOTAL_STEPS=${FINETUNE_TOTAL_STEPS:-2000}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-100}
QUANTIZE_BASE=${QUANTIZE_BASE:-none}                               # none | nf4 | int8
NUM_GPUS=${NUM_GPUS:-1}                                            # = pipeline stages (one per GPU)
MASTER_PORT=${MASTER_PORT:-7033}
export WANDB_NAME=${WANDB_NAME:-Qwen3-8B-lora}

ARGS=(
  --model-name "${BASE_MODEL}"
  --tokenizer-name "${BASE_MODEL}"
  --task-name "${DATASETS}"
  --checkpoint-path "${CHECKPOINT_PATH}"
  --total-steps "${TOTAL_STEPS}" --warmup-steps 20
  --checkpoint-steps "${CHECKPOINT_STEPS}"
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules all-linear
  --quantize-base "${QUANTIZE_BASE}"
  --lr 1e-4 --seq-length 2048 --batch-size 16 --micro-batch-size 4 --gradient-accumulate-step 1
  --bf16 --activation-checkpointing selective
  --pipeline-group-size "${NUM_GPUS}" --pp-mode 1f1b
)
# Unquoted on purpose: EXTRA_ARGS holds several flags, split at spaces (so no spaces inside its values).
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

exec "${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node "${NUM_GPUS}" --master_port "${MASTER_PORT}" \
  "${TRAINER}" "${ARGS[@]}"
