#!/usr/bin/env bash
# The demo: build the offline tiny model, then run the pipeline's stages on the bundled examples.
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGN=${ALIGN:-.venv/bin/align}
MODEL=examples/models/tiny
export ALIGN_RUNS_DIR=${ALIGN_RUNS_DIR:-runs/demo}

if [ ! -f "$MODEL/model.safetensors" ]; then
  $ALIGN init-model --preset tiny --out "$MODEL"
fi

echo "== align sft: Alpaca-style instructions, loss on responses only"
$ALIGN sft --recipe recipes/sft-tiny.yaml --out "$ALIGN_RUNS_DIR/sft" --set output.overwrite=true
