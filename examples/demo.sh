#!/usr/bin/env bash
# The demo: the DPO paper's controlled-sentiment experiment, offline and CPU-sized (5-8 minutes on 2 cores).
# Builds the offline tiny model and the synthetic review data, then `align frontier` runs
# SFT -> reward model -> {Preferred-FT, DPO over beta, PPO / GRPO / RLOO over their KL coefficient,
# DPO on ground-truth-labelled SFT samples over beta, best-of-N over N}
# and evaluates every policy against the SFT model: hidden ground-truth sentiment vs KL(policy || SFT).
# Stages already finished under runs/sentiment are not run again (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGN=${ALIGN:-.venv/bin/align}
PYTHON=${PYTHON:-.venv/bin/python}
export COLUMNS=${COLUMNS:-120}  # wide enough for the final table when the output is not a terminal
MODEL=examples/models/tiny

if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "== align init-model: a random-init tiny Llama with an offline tokenizer"
  $ALIGN init-model --preset tiny --out "$MODEL"
fi

echo "== the sentiment task's data: reviews for SFT, preference pairs, prompts"
$PYTHON examples/sentiment/make_data.py

echo "== align frontier: every method, then ground-truth reward vs KL"
$ALIGN frontier --recipe examples/sentiment/frontier.yaml

echo
echo "Table: runs/sentiment/frontier.csv   plot: runs/sentiment/frontier.png"
echo "Each stage's run (metrics.csv, metrics.png, final/) is under runs/sentiment/."
