#!/usr/bin/env bash
# After tools/train_model.py has written runs/deepseek_mini/final: install it as the embedded model
# moe/deepseek_mini (config, weights, tokenizer, training record), trace its routing (the trace placement reads)
# and evaluate it against the default model. Usage: tools/finish_deepseek_mini.sh [run-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/deepseek_mini}
PY=${PYTHON:-.venv/bin/python}
test -f "$RUN/final/model.safetensors" || { echo "no $RUN/final/model.safetensors" >&2; exit 2; }
mkdir -p moe/deepseek_mini
cp "$RUN/final/config.json" "$RUN/final/model.safetensors" "$RUN/final/tokenizer.json" \
   "$RUN/final/tokenizer_config.json" "$RUN/final/training.json" moe/deepseek_mini/
OMP_NUM_THREADS=1 $PY tools/trace_default_model.py --model moe/deepseek_mini --out moe/deepseek_mini/trace.npz \
   --tokens-per-domain 12288 --threads 1
OMP_NUM_THREADS=1 $PY benchmarks/eval_model.py --model deepseek-mini --compare default --json "$RUN/eval.json"
