#!/usr/bin/env bash
# One GPU node under torchrun: 8 GPUs as 4 pipeline stages x 2 data-parallel replicas, bf16.
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; each process uses GPU LOCAL_RANK.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to a Hugging Face model directory}
DATA=${DATA:?set DATA to path[:weight],... of .jsonl files}
# c10d rendezvous with a fresh store per attempt, so --max-restarts can restart cleanly (see README).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
torchrun --nproc_per_node="${NPROC:-8}" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint localhost:0 dist_lm_pretrain_and_finetune.py \
  --model-name "$MODEL" --task-name "$DATA" \
  --pipeline-group-size "${PP:-4}" --data-group-size "${DP:-2}" --pp-mode 1f1b \
  --seq-length 2048 --batch-size 32 --micro-batch-size 2 --total-steps "${TOTAL_STEPS:-1000}" \
  --warmup-steps 10 --lr 1e-5 --bf16 --dp-backend nccl \
  --checkpoint-path "${CHECKPOINT_PATH:-model_ckpts/torchrun}" --checkpoint-steps 100 "$@"
