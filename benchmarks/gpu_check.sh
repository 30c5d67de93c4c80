#!/usr/bin/env bash
# The GPU check (issue 19): the tests that exercise CUDA paths, then one short offload benchmark on the GPU.
# Run it on a machine with a GPU (the device tool runs it in a copy of the working tree):
#     bash benchmarks/gpu_check.sh
# It uses the machine's own python3 (torch with CUDA, transformers, safetensors, tokenizers, pytest) and imports
# moeyard from the tree without installing it. Prints a final "gpu_check: N passed, N failed" line. < 8 minutes.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PK=$(mktemp -d)
mkdir -p "$PK/moeyard"
for d in runtime moe offload comm placement cluster; do ln -s "$PWD/$d" "$PK/moeyard/$d"; done
export PYTHONPATH="$PK:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
TESTS="tests/test_cuda.py tests/test_engine.py tests/test_models_vs_hf.py tests/test_archs_v3_oss.py tests/offload
tests/test_inflate.py tests/test_default_model.py"
timeout 420 $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee /tmp/gpu_check_tests.log | tail -25
counts=$($PY - <<'PYEOF'
import re
text = open("/tmp/gpu_check_tests.log").read()
lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|errors?)", l)]
last = lines[-1] if lines else ""
n = lambda w: sum(int(x) for x in re.findall(rf"(\d+) {w}", last))
print(n("passed"), n("failed") + n("errors?"))
PYEOF
)
read -r passed failed <<< "$counts"
echo "--- offload on the GPU (inflated default model, 25% of experts in GPU slots, host tier) ---"
timeout 150 $PY benchmarks/bench_offload.py --models default --width 4096 --fractions 0.25 --batches 1 \
    --reps 1 --new-tokens 32 --prompts 4 --only "gate,LRU" 2>&1 | tail -8
echo "gpu_check: ${passed:-0} passed, ${failed:-0} failed"
