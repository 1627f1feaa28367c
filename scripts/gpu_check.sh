#!/usr/bin/env bash
# Device check for one GPU (H100/H200). Finishes in well under 5 minutes; everything it
# writes goes to $OUT (default ./gpu_out). Run from anywhere:  OUT=/some/dir bash scripts/gpu_check.sh
#
#   1. the core gradient tests (solvers, backward modes, DEQ) with torch's default device set
#      to cuda: the tests take no device argument, so this is a best-effort run; a failure that
#      names a CPU generator or a CPU tensor is the test's own set-up, anything else is a finding;
#   2. `phantomgrad bench` on mdeq-tiny at CIFAR size (3x32x32, batch 32) with --device cuda:
#      every backward mode, the solver table, sweeps over k and K, peak memory from the CUDA
#      allocator, and TorchDEQ side by side when it is installed
#      (pip install --no-deps torchdeq==0.1.0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .`
start=$(date +%s)

{ nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tail -1

# 1. core tests on cuda (about 1 minute)
timeout 150 python - > "$OUT/core_tests_cuda.txt" 2>&1 <<'EOF'
import sys
import pytest
import torch

assert torch.cuda.is_available(), "no CUDA device"
torch.set_default_device("cuda")
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_solvers.py", "tests/test_backward.py", "tests/test_deq.py"]))
EOF
echo "core tests on cuda: exit $? ($(tail -1 "$OUT/core_tests_cuda.txt"))" | tee "$OUT/summary.txt"

# 2. the benchmark on cuda (about 2 minutes)
compare=()
python -c "import torchdeq" 2>/dev/null && compare=(--compare torchdeq)
timeout 240 python -m phantomgrad bench --model mdeq-tiny --batch 32 --device cuda --repeats 7 --warmup 2 \
  --sweep-k 1..10 --sweep-K 5,10,20,30,40 --sweep-repeats 3 "${compare[@]}" \
  --out "$OUT/bench" --json "$OUT/bench/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench on cuda: exit $?" | tee -a "$OUT/summary.txt"
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
