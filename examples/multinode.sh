#!/usr/bin/env bash
# Several GPU nodes: run this on every node with the same MASTER_ADDR and NNODES, and NODE_RANK = 0..NNODES-1.
# The checkpoint path must be on a filesystem every node sees (checkpoints are written by all ranks).
# Under SLURM: NODE_RANK=$SLURM_NODEID NNODES=$SLURM_NNODES MASTER_ADDR=$(scontrol show hostnames | head -1).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL}; DATA=${DATA:?set DATA}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to node 0}; NNODES=${NNODES:?}; NODE_RANK=${NODE_RANK:?}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # a fresh rendezvous store per restart attempt (see README)
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${JOB_ID:-finetune}" \
  --max-restarts "${MAX_RESTARTS:-3}" \
  dist_lm_pretrain_and_finetune.py \
  --model-name "$MODEL" --task-name "$DATA" \
  --pipeline-group-size "${PP:-8}" --data-group-size "$((NNODES * ${GPUS_PER_NODE:-8} / ${PP:-8}))" \
  --pp-mode 1f1b --seq-length 2048 --batch-size 64 --micro-batch-size 1 --total-steps "${TOTAL_STEPS:-20000}" \
  --lr 1e-6 --fp16 --activation-checkpointing full --dp-backend nccl \
  --checkpoint-path "${CHECKPOINT_PATH:?shared directory}" --checkpoint-steps 100 "$@"
