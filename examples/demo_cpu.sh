#!/usr/bin/env bash
# CPU demo: a tiny GPT-NeoX-architecture model (made locally, random weights) fine-tuned on the bundled sample chat
# data with a 2-stage pipeline: 2 processes, gloo, no GPU. The data is 20 simple facts asked in chat form
# (assets/data/make_sample_data.py); the model learns them by heart (loss on the answers ~7.4 at step 10 -> ~0.1) and
# answers one of them at the end. About 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
MODEL=$OUT/tiny-gptneox
# Run again and again: each run starts over, replacing the demo's own earlier output (a marker file says the folder
# is the demo's). Checkpoints in a folder the demo did not make stay: --load-checkpoint false refuses them below.
if [ -f "$OUT/.demo-output" ]; then
  rm -rf "$OUT/checkpoints" "$OUT/hf-export" "$OUT/metrics.jsonl" "$OUT/curves.png"
fi
mkdir -p "$OUT"
if [ ! -e "$OUT/checkpoints" ]; then touch "$OUT/.demo-output"; fi
if [ ! -f "$MODEL/config.json" ]; then
  python3 tools/make_tiny_model.py --output "$MODEL" --model-type gptneox --hidden-size 128 --num-layers 4 \
    --num-heads 4
fi
export OMP_NUM_THREADS=1
# The entrypoint's launcher mode (torchrun's machinery): a mistake in the flags below or in "$@" ends with one line.
python3 dist_lm_pretrain_and_finetune.py --nproc-per-node 2 \
  --model-name "$MODEL" --tokenizer-name "$MODEL" --model-type gptneox \
  --task-name assets/data/sample_chat.jsonl:0.7,assets/data/sample_messages.jsonl:0.3 \
  --evaluation-data assets/data/sample_eval.jsonl --evaluation-steps 50 --evaluation-num-batch 4 \
  --seq-length 128 --batch-size 4 --micro-batch-size 1 --gradient-accumulate-step 1 --loss-on-bot-only \
  --total-steps "${DEMO_STEPS:-200}" --warmup-steps 10 --lr 5e-3 --lr-scheduler cosine --adam-beta2 0.95 \
  --pipeline-group-size 2 --data-group-size 1 --pp-mode 1f1b \
  --use-cuda false --dp-backend gloo \
  --checkpoint-path "$OUT/checkpoints" --checkpoint-steps 50 --load-checkpoint false \
  --log-interval 10 --metrics-file "$OUT/metrics.jsonl" "$@"
python3 tools/convert_to_hf.py --checkpoint-path "$OUT/checkpoints" --output "$OUT/hf-export"
# One exchange with the export, greedy: a question from the bundled data.
echo ">>> What is the capital of France?"
python3 tools/chat.py "$OUT/hf-export" --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 32
echo "curves: python3 tools/plot_metrics.py $OUT/metrics.jsonl --output $OUT/curves.png"
echo "talk to it: python3 tools/chat.py $OUT/hf-export"
