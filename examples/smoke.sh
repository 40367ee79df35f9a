#!/usr/bin/env bash
# Every subcommand end to end on the tiny offline model, in a scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGN=${ALIGN:-.venv/bin/align}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ALIGN_RUNS_DIR="$work/runs"
step() { echo; echo "== smoke: $*"; }

step "init-model"
$ALIGN init-model --preset tiny --out "$work/tiny"

step "data check"
$ALIGN data check examples/data/alpaca.jsonl --model "$work/tiny"
$ALIGN data check examples/data/prefs.jsonl --model "$work/tiny"

step "sft (alpaca)"
$ALIGN sft --recipe recipes/sft-tiny.yaml --model "$work/tiny" --out "$work/sft" --max-steps 6 \
  --set training.save_every=3 --set training.log_every=1
test -d "$work/sft/final" && test -f "$work/sft/metrics.csv"
step "sft --resume (continues from checkpoint-0000003)"
$ALIGN sft --recipe recipes/sft-tiny.yaml --model "$work/tiny" --out "$work/sft" --max-steps 6 \
  --set training.save_every=3 --set training.log_every=1 --resume

step "sft (chat messages, packing, bf16, 8-bit AdamW)"
$ALIGN sft --model "$work/tiny" --data examples/data/chat.jsonl --out "$work/sft-chat" --max-steps 4 \
  --set data.packing=true --set training.precision=bf16 --set training.optimizer=adamw_8bit

echo; echo "smoke test passed"
