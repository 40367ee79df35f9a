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


step "generate (one JSONL row per prompt) and chat (piped: two turns, /reset, end of input)"
head -n 5 examples/data/alpaca.jsonl > "$work/prompts.jsonl"
$ALIGN generate --model "$work/sft/final" --prompts "$work/prompts.jsonl" --prompt "Name a colour." \
  --max-new-tokens 8 --out "$work/generated.jsonl"
test "$(wc -l < "$work/generated.jsonl")" -eq 6
printf 'Hello\nName a colour.\n/reset\nHi again\n' | $ALIGN chat --model "$work/sft/final" --max-new-tokens 8

step "reward (pairs with Llama 2 margins), from the SFT model"
$ALIGN reward --recipe recipes/reward-tiny.yaml --model "$work/sft/final" --out "$work/reward" --max-steps 6
test -f "$work/reward/final/model.safetensors"

step "reward (ranked lists: InstructGPT K-way)"
$ALIGN reward --recipe recipes/reward-tiny.yaml --model "$work/tiny" --data examples/data/ranked.jsonl \
  --out "$work/reward-ranked" --max-steps 3

step "reward score"
$ALIGN reward score --model "$work/reward/final" --data examples/data/prefs.jsonl --out "$work/scored.jsonl"
test "$(wc -l < "$work/scored.jsonl")" -eq "$(wc -l < examples/data/prefs.jsonl)"
grep -q '"reward_chosen"' "$work/scored.jsonl"

step "dpo (no model named: policy and reference = the last sft output), then Plackett-Luce on rankings"
$ALIGN dpo --data examples/data/prefs.jsonl --out "$work/dpo" --max-steps 4 --set training.micro_batch_size=8
test -f "$work/dpo/final/model.safetensors"
$ALIGN dpo --recipe recipes/dpo-tiny.yaml --model "$work/sft/final" --data examples/data/ranked.jsonl \
  --out "$work/dpo-ranked" --max-steps 2 --set training.micro_batch_size=4

step "rejection-sample --n 4, then a round of SFT on the best"
$ALIGN rejection-sample --model "$work/sft/final" --reward-model "$work/reward/final" \
  --prompts examples/data/prompts.jsonl --n 4 --then sft --out "$work/rs" --max-steps 2 \
  --set rejection.max_prompts=8 --set rejection.max_new_tokens=12 --set rejection.eval_n=2

step "ppo (2 iterations)"
$ALIGN ppo --recipe recipes/ppo-tiny.yaml --model "$work/sft/final" --reward-model "$work/reward/final" \
  --out "$work/ppo" --max-steps 2 --set ppo.rollout_batch_size=4 --set ppo.mini_batch_size=2 \
  --set ppo.max_new_tokens=8 --set ppo.ppo_epochs=1
test -f "$work/ppo/final/model.safetensors"

step "eval (DPO policy vs its SFT reference)"
$ALIGN eval --model "$work/dpo/final" --reference "$work/sft/final" --prompts examples/data/prompts.jsonl \
  --reward-model "$work/reward/final" --ground-truth examples/make_data.py:positivity --n 2 \
  --max-new-tokens 8 --out "$work/eval"
test -f "$work/eval/eval.json"

step "pipeline (sft -> reward -> dpo, chained by @name), then frontier on the finished stages"
cat > "$work/pipeline.yaml" <<YAML
output: $work/pipeline
stages:
  - {name: sft, stage: sft, recipe: recipes/sft-tiny.yaml,
     set: ["model.name_or_path=$work/tiny", "training.max_steps=3"]}
  - {name: reward, stage: reward, recipe: recipes/reward-tiny.yaml,
     set: ["model.name_or_path=@sft", "training.max_steps=3"]}
  - {name: dpo, stage: dpo, recipe: recipes/dpo-tiny.yaml,
     set: ["model.name_or_path=@sft", "training.max_steps=2", "training.micro_batch_size=8"]}
evaluate:
  reference: "@sft"
  prompts: examples/data/prompts.jsonl
  ground_truth: examples/make_data.py:positivity
  reward_model: "@reward"
  n: 2
  max_new_tokens: 8
  methods: {SFT: [sft], DPO: [dpo]}
  best_of_n: [1, 2]
YAML
$ALIGN pipeline --recipe "$work/pipeline.yaml"
$ALIGN frontier --recipe "$work/pipeline.yaml"
test -f "$work/pipeline/frontier.csv" && test -f "$work/pipeline/frontier.png"

step "plan (memory per device from the config alone: DPO on 2 processes, ZeRO-3)"
$ALIGN plan --recipe recipes/dpo-tiny.yaml --model "$work/sft/final" --processes 2 --shard zero3

step "LoRA SFT, then export with the adapter merged; the export loads with from_pretrained"
$ALIGN sft --recipe recipes/sft-tiny.yaml --model "$work/tiny" --out "$work/sft-lora" --max-steps 2 \
  --set model.lora.enabled=true
$ALIGN export --model "$work/sft-lora/final" --merge-lora --out "$work/merged"
.venv/bin/python -c "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1])" \
  "$work/merged"

echo; echo "smoke test passed"
