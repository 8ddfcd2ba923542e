#!/usr/bin/env bash
# Several nodes: run this on every node with the same environment (MODEL, DATA, CHECKPOINT_PATH, MASTER_ADDR,
# NNODES). Each node starts one launcher (the entrypoint's --nproc-per-node mode: torch.distributed.elastic, as
# torchrun) with GPUS_PER_NODE workers; the launchers meet at MASTER_ADDR:MASTER_PORT (c10d rendezvous, hosted by
# whichever launcher starts there first) and number the nodes themselves: no NODE_RANK needed.
# CHECKPOINT_PATH must be a directory every node sees (every rank writes its part of a checkpoint).
# With MAX_RESTARTS=N a failed or lost worker restarts the job on every node, resuming exactly from `latest`.
# Under SLURM see examples/slurm.sbatch.
#   MODEL=... DATA=... CHECKPOINT_PATH=/shared/ckpt MASTER_ADDR=node0 NNODES=2 bash examples/multinode.sh
# Flags after the script's name are appended (a later flag wins); TRAIN_FLAGS replaces the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to a Hugging Face model directory}
DATA=${DATA:?set DATA to path[:weight],... of .jsonl files}
CHECKPOINT_PATH=${CHECKPOINT_PATH:?set CHECKPOINT_PATH to a directory every node sees}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of one node, the same on every node}
NNODES=${NNODES:?set NNODES to the number of nodes}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PP=${PP:-8}
DP=$((NNODES * GPUS_PER_NODE / PP))
TRAIN_FLAGS=${TRAIN_FLAGS:---pp-mode 1f1b --seq-length 2048 --batch-size 64 --micro-batch-size 1 --total-steps 20000 \
--lr 1e-6 --fp16 --activation-checkpointing full --dp-backend nccl --checkpoint-steps 100}
NET_FLAGS=()
if [ -n "${NET_INTERFACE:-}" ]; then NET_FLAGS=(--net-interface "$NET_INTERFACE"); fi  # e.g. eth0, ib0
# shellcheck disable=SC2086  # TRAIN_FLAGS holds several flags, split at spaces
exec "${PYTHON:-python3}" dist_lm_pretrain_and_finetune.py \
  --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${JOB_ID:-finetune}" \
  --model-name "$MODEL" --task-name "$DATA" --checkpoint-path "$CHECKPOINT_PATH" \
  --pipeline-group-size "$PP" --data-group-size "$DP" "${NET_FLAGS[@]}" $TRAIN_FLAGS "$@"
