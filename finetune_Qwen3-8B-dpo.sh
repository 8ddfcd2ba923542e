#!/usr/bin/env bash
# Preference tuning (DPO) of a chat model after supervised fine-tuning, with LoRA on ONE 80 GB GPU: the reference
# model is the same base with the adapters off, so it costs no memory. BASE_MODEL is the SFT result as a Hugging
# Face directory (tools/convert_to_hf.py --merge-lora writes one); DATASETS holds prompt / chosen / rejected
# records, plain text or message lists (rendered with the tokenizer's chat template, as TRL does). OBJECTIVE=simpo
# or orpo trains without a reference. --batch-size and --micro-batch-size count pairs; --seq-length bounds one
# prompt + completion. Logged as TRL logs it: rewards/chosen, rewards/rejected, rewards/accuracies,
# rewards/margins, logps/chosen, logps/rejected. Copy this file and edit the variables below, or set them in the
# environment; EXTRA_ARGS="..." is appended to the flags (NUM_GPUS=2 runs a pipeline of 2 stages).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)

BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/Qwen3-8B-sft"}          # a Hugging Face model directory
DATASETS=${DATASETS:-"${DIR}/data/preferences"}                    # .jsonl / .parquet files of preference pairs
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/Qwen3-8B-dpo"}
TRAINER=${TRAINER:-"${DIR}/dist_lm_pretrain_and_finetune.py"}
TOTAL_STEPS=${FINETUNE_TOTAL_STEPS:-1000}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-100}
OBJECTIVE=${OBJECTIVE:-dpo}                                        # dpo | simpo | orpo
NUM_GPUS=${NUM_GPUS:-1}                                            # = pipeline stages (one per GPU)
MASTER_PORT=${MASTER_PORT:-7033}
export WANDB_NAME=${WANDB_NAME:-Qwen3-8B-${OBJECTIVE}}

ARGS=(
  --model-name "${BASE_MODEL}"
  --tokenizer-name "${BASE_MODEL}"
  --task-name "${DATASETS}"
  --checkpoint-path "${CHECKPOINT_PATH}"
  --objective "${OBJECTIVE}"
  --total-steps "${TOTAL_STEPS}" --warmup-steps 20
  --checkpoint-steps "${CHECKPOINT_STEPS}"
  --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear
  --lr 5e-6 --seq-length 1024 --batch-size 8 --micro-batch-size 2 --gradient-accumulate-step 1
  --bf16 --activation-checkpointing selective
  --pipeline-group-size "${NUM_GPUS}" --pp-mode 1f1b
)
# Unquoted on purpose: EXTRA_ARGS holds several flags, split at spaces (so no spaces inside its values).
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

exec "${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node "${NUM_GPUS}" --master_port "${MASTER_PORT}" \
  "${TRAINER}" "${ARGS[@]}"
