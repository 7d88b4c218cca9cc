#!/usr/bin/env bash
# One prepared GPU session (offline machine with torch): the GPU benchmarks first, alone on the
# device, then full-scale notebooks, several at once (each writes into its own folder), every
# one under a time cap. Everything lands in $OUT/gpu.tar.gz (+ a log), for merging with
# `python3 tasks.py merge-full <folder>`.
#   OUT=/tmp/out NOTEBOOK_CAP=420 PARALLEL=6 bash benchmarks/gpu_session.sh slug1 slug2 ...
set -u
OUT=${OUT:-/tmp/out}
CAP=${NOTEBOOK_CAP:-420}
PAR=${PARALLEL:-6}
WORK=/tmp/gpu-session
rm -rf "$WORK"; mkdir -p "$WORK/full" "$WORK/bench" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} COMPANION_USE_CURRENT_PYTHON=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$WORK/device.txt"
T0=$(date +%s)
if [ "${BENCH:-1}" = 1 ]; then
  (cd benchmarks && timeout 150 python3 bench_gau.py --device cuda --d-model 768 --batch-size 8 \
      --lengths 512 1024 2048 4096 --repeats 20) > "$WORK/bench/gau-h200.md" 2>&1
  echo "gau bench done at $(( $(date +%s) - T0 )) s"
fi
run_one() {
  slug=$1
  mkdir -p "$WORK/full/$slug"
  COMPANION_FULL_OUT="$WORK/full/$slug" timeout "$CAP" python3 tasks.py full "notebooks/$slug.ipynb" \
      > "$WORK/full/$slug/run.txt" 2>&1
  echo "$slug rc=$? at $(( $(date +%s) - T0 )) s"
}
export -f run_one; export WORK CAP T0
printf '%s\n' "$@" | xargs -P "$PAR" -I{} bash -c 'run_one {}'
tar -czf "$OUT/gpu.tar.gz" -C "$WORK" .
echo "total $(( $(date +%s) - T0 )) s"
