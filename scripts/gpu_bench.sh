#!/usr/bin/env bash
# GPU benchmark for one GPU (H100/H200), under 6 minutes: phantomgrad against TorchDEQ 0.1.0 on
#   1. MDEQ-Tiny (3x32x32) at batch 32,   2. MDEQ-Tiny at batch 128,   3. the small DEQ transformer LM,
# every backward mode (TorchDEQ side by side where it has an equivalent, "n/a" where not), each with
# a check_every=None (sync-free) row, and 4. the compiled training step (torch.compile) of UPG and JFB.
# Writes to OUT_DIR (default $OUT, else ./gpu_bench_out), flat, at most 8 files:
#   gpu_bench.md (one table per run and a TorchDEQ/phantomgrad summary), mdeq32.json, mdeq128.json,
#   lm.json, compiled.json (every measurement; `phantomgrad bench --render FILE` prints its tables again),
#   summary.txt (exit status and seconds of each run), device.txt, log.txt.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]              # on a GPU
#   bash scripts/gpu_bench.sh --device cpu --tiny    # the same path at toy sizes on a CPU, in about a minute
#
# Then, in the same device session: `python scripts/gpu_sync_check.py --json OUT_DIR/sync.json` (about a
# minute: no host sync inside the DEQ layer under torch.cuda.set_sync_debug_mode("error"), and the UPG step
# captured with mode="reduce-overhead"); add `--fused` for the fused solver bookkeeping.
#
# TorchDEQ: used when importable; otherwise installed without its dependencies (so torch stays as it
# is) from a wheel in .vendor/ (fetch it once where pip has a network: `pip download --no-deps -d .vendor
# torchdeq==0.1.0`, and carry .vendor to the GPU machine), else from the index; without it the runs go
# on with phantomgrad alone.
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda
tiny=0
out_arg=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) out_arg="$1"; shift ;;
  esac
done
OUT_DIR="${out_arg:-${OUT:-gpu_bench_out}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .`
export PYTHONUNBUFFERED=1
work="$(mktemp -d)"  # bench.md of each run: kept out of OUT_DIR (few files come back from a GPU machine)
start=$(date +%s)
log="$OUT_DIR/log.txt"
: > "$log"

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; } \
  > "$OUT_DIR/device.txt" 2>&1

if ! python -c "import torchdeq" 2>/dev/null && [ "$tiny" = 0 ]; then
  { python -m pip install -q --no-deps --no-index --find-links .vendor torchdeq==0.1.0 \
      || python -m pip install -q --no-deps torchdeq==0.1.0; } >> "$log" 2>&1
fi
compare=()
python -c "import torchdeq" 2>/dev/null && compare=(--compare torchdeq)
echo "torchdeq: ${compare[*]:-not installed, phantomgrad alone}" | tee "$OUT_DIR/summary.txt"

if [ "$tiny" = 1 ]; then  # toy sizes: the whole path in about a minute on a CPU
  sizes=(--image-size 8 --seq-len 8 --solver-iter 4 --backward-iter 4 --repeats 1 --warmup 0 --no-memory --no-solvers)
  batch_small=2; batch_large=4; lm_batch=2; limit=300; compile_backend=(--compile-backend eager)
else
  sizes=(--repeats 5 --warmup 2)
  batch_small=32; batch_large=128; lm_batch=32; limit=85; compile_backend=()
fi

bench() {  # name, timeout in s, then bench arguments
  local name="$1" seconds="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name: phantomgrad bench $*" >> "$log"
  timeout "$seconds" python -m phantomgrad bench --device "$device" "$@" --out "$work/$name" \
    --json "$OUT_DIR/$name.json" >> "$log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/summary.txt"
}

bench mdeq32 "$limit" --model mdeq-tiny --batch "$batch_small" --sync-free "${compare[@]}" "${sizes[@]}"
bench mdeq128 "$limit" --model mdeq-tiny --batch "$batch_large" --sync-free "${compare[@]}" "${sizes[@]}"
bench lm "$limit" --model deq-transformer-small --batch "$lm_batch" --sync-free "${compare[@]}" "${sizes[@]}"
bench compiled "$(( limit + 5 ))" --model mdeq-tiny --batch "$batch_small" --modes upg,jfb --sync-free --compiled \
  "${compile_backend[@]}" --no-cosine --no-solvers "${sizes[@]}"

python scripts/bench_summary.py "$OUT_DIR/gpu_bench.md" "$OUT_DIR"/mdeq32.json "$OUT_DIR"/mdeq128.json \
  "$OUT_DIR"/lm.json "$OUT_DIR"/compiled.json >> "$log" 2>&1
echo "summary: exit $? -> $OUT_DIR/gpu_bench.md" | tee -a "$OUT_DIR/summary.txt"
rm -rf "$work"
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"
