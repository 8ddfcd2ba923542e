#!/usr/bin/env bash
# Fine-tune GPT-NeoX-20B into GPT-NeoXT-Chat-Base-20B: 8 processes on one 8-GPU node, pipeline of 8 stages.
# Copy this file and edit the variables below (or set them in the environment). NUM_GPUS=4 runs 4 stages of 11
# layers; fp32 Adam moments alone are then 40 GB per stage, so on 80 GB cards try
# EXTRA_ARGS="--optimizer 8bit-adam --pp-mode 1f1b" (bench/RESULTS.md: GPT-NeoX-20B on 4 x H100 80GB peaked at
# 67.5 GB with 8-bit Adam, 1f1b, bf16 and no recompute; this recipe's fp16 + full recompute was not run on 4 GPUs;
# gpipe holds all 64 micro-batches' activations).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)

BASE_MODEL=${BASE_MODEL:-"${DIR}/pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b"}  # HF or layer-sharded dir
DATASETS=${DATASETS:-"${DIR}/data/OIG/files"}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-"${DIR}/model_ckpts/GPT-Neo-XT-Chat-Base-20B"}
TRAINER=${TRAINER:-"${DIR}/dist_lm_pretrain_and_finetune.py"}  # set it when the copy lives elsewhere
TOTAL_STEPS=${FINETUNE_TOTAL_STEPS:-20000}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-100}
NUM_GPUS=${NUM_GPUS:-8}                                 # = pipeline stages (one per GPU)
MODEL_LAYERS=44                                         # GPT-NeoX-20B
LAYERS_PER_STAGE=$(( (MODEL_LAYERS + NUM_GPUS - 1) / NUM_GPUS ))
MASTER_PORT=${MASTER_PORT:-7033}                        # another job on this node? pick another port
netif=${NET_INTERFACE:-lo}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$netif}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$netif}
export WANDB_NAME=${WANDB_NAME:-GPT-NeoXT-Chat-Base-20B}

gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
if [ "${gpus:-0}" -lt "$NUM_GPUS" ]; then
  echo "error: this recipe runs ${NUM_GPUS} processes, one per GPU, but nvidia-smi lists ${gpus:-0} GPU(s);" \
       "use a node with ${NUM_GPUS} GPUs or copy the script and lower --pipeline-group-size/--world-size" >&2
  exit 2
fi

# One array element per word, so paths with spaces stay whole: keep the quotes around values when editing.
ARGS=(
  --model-name "${BASE_MODEL}"
  --tokenizer-name "${BASE_MODEL}"
  --project-name together
  --model-type gptneox
  --optimizer adam
  --seed 42
  --load-pretrained-model true
  --task-name "\
${DATASETS}/unified_ni.jsonl:0.2,\
${DATASETS}/unified_p3.jsonl:0.5,\
${DATASETS}/unified_flan.jsonl:0.2,\
${DATASETS}/unified_chip2.jsonl:0.01,\
${DATASETS}/unified_rallio_safety_and_prosocial.jsonl:0.1,\
${DATASETS}/unified_soda_dialog.jsonl:0.1,\
${DATASETS}/unified_unifiedskg_instructions.jsonl:0.1,\
${DATASETS}/unified_merged_code_xp3.jsonl:0.1,\
${DATASETS}/unified_oscar_en_sample_dialog.jsonl:0.1,\
${DATASETS}/unified_ul2_plus_oscar_en_sample_dialog.jsonl:0.1,\
${DATASETS}/unified_multi_news.jsonl:0.05,\
${DATASETS}/unified_openai_summarize_tldr.jsonl:0.05,\
${DATASETS}/unified_squad_v2.jsonl:0.01,\
${DATASETS}/unified_nq.jsonl:0.01,\
${DATASETS}/unified_poetry_instructions.jsonl:0.01,\
${DATASETS}/unified_sqlv2.jsonl:0.01,\
${DATASETS}/unified_unnatural_instructions.jsonl:0.01,\
${DATASETS}/unified_conv_finqa.jsonl:0.01,\
${DATASETS}/unified_essays.jsonl:0.01,\
${DATASETS}/unified_plot_screenplay_books_dialog.jsonl:0.01,\
${DATASETS}/unified_grade_school_math_instructions.jsonl:0.01,\
${DATASETS}/unified_mathqa_flanv2_kojma_cot.jsonl:0.01,\
${DATASETS}/unified_joke_explanations.jsonl:0.01,\
${DATASETS}/unified_cuad.jsonl:0.01,\
${DATASETS}/unified_abstract_infill.jsonl:0.1,\
${DATASETS}/unified_image_prompts_instructions.jsonl:0.01"
  --checkpoint-path "${CHECKPOINT_PATH}"
  --total-steps "${TOTAL_STEPS}" --warmup-steps 10 --train-warmup-steps 0
  --checkpoint-steps "${CHECKPOINT_STEPS}"
  --lr 1e-6 --seq-length 2048 --batch-size 64 --micro-batch-size 1 --gradient-accumulate-step 1
  --dist-url "tcp://127.0.0.1:${MASTER_PORT}"
  --num-layers "${LAYERS_PER_STAGE}" --embedding-dim 6144
  --world-size "${NUM_GPUS}" --pipeline-group-size "${NUM_GPUS}" --data-group-size 1
  --job-id 0 --net-interface "${netif}"
  --fp16
  --dp-backend nccl
  --dp-mode allreduce
  --pp-mode gpipe --profiling no-profiling
  --activation-checkpointing full
)
# Unquoted on purpose: EXTRA_ARGS holds several flags, split at spaces (so no spaces inside its values).
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

# One process per GPU. The first one to fail stops the others: a rank that dies before the job is up (a port in
# use, say) would otherwise leave them waiting for it until --dist-timeout.
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for rank in $(seq 0 $((NUM_GPUS - 1))); do
  "${PYTHON:-python3}" "${TRAINER}" "${ARGS[@]}" --cuda-id "$rank" --rank "$rank" &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  wait -n && continue
  code=$?
  if [ "$status" -eq 0 ]; then
    status=$code
    kill "${pids[@]}" 2>/dev/null || true  # some may have exited already: not an error of its own
  fi
done
exit $status
