#!/usr/bin/env bash
# Fine-tune Pythia-6.9B into Pythia-Chat-Base-7B: 8 processes on one 8-GPU node, pipeline of 4 x 2 replicas.
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)
BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/Pythia-6.9B-deduped/EleutherAI_pythia-6.9b-deduped"}
DATASETS=${DATASETS:-"${DIR}/data/OIG/files"}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/Pythia-Chat-Base-7B"}
NUM_GPUS=8
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
if [ "${gpus:-0}" -lt "$NUM_GPUS" ]; then
  echo "error: this recipe needs ${NUM_GPUS} GPUs, nvidia-smi lists ${gpus:-0}" >&2
  exit 2
fi
torchrun --nproc_per_node=${NUM_GPUS} "${DIR}/dist_lm_pretrain_and_finetune.py" \
  --model-name "${BASE_MODEL}" --tokenizer-name "${BASE_MODEL}" --model-type gptneox \
  --task-name "${DATASETS}" \
  --checkpoint-path "${CHECKPOINT_PATH}" --checkpoint-steps "${CHECKPOINT_STEPS:-100}" \
  --total-steps "${FINETUNE_TOTAL_STEPS:-20000}" --warmup-steps 10 --lr 1e-5 \
  --seq-length 2048 --batch-size 32 --micro-batch-size 1 --gradient-accumulate-step 1 \
  --pipeline-group-size 4 --data-group-size 2 --pp-mode 1f1b --optimizer adam --fp16 \
  --dp-backend nccl --seed 42 "$@"
