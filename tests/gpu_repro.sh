#!/usr/bin/env bash
# The paper's CE ablation (Table 6) on CIFAR-10-LT IF 100, ResNet-32, batch 256: CE against
# CE+GBG+MOO with the GAC sampler, as two processes side by side on one GPU.
#
#   bash tests/gpu_repro.sh                       # 200 epochs each, on the GPU, bf16 autocast
#   EPOCHS=1 DEVICE=cpu bash tests/gpu_repro.sh   # the same path on the CPU (what the tests run)
#   PYTHON=/path/to/python bash tests/gpu_repro.sh   # the interpreter to use (default: python on PATH)
#
# Data: a CIFAR-10 JPEG copy (ImageFolder layout train/<class>/*.jpg, test/<class>/*.jpg, packed as
# .data/cifar10-jpg.tar.gz in the checkout); it is unpacked into .data/cifar10 once. Each run's log.txt,
# results.json, groups.json, stdout and wall time go to $OUTDIR/<run>/. Each run is stopped at
# TIME_LIMIT seconds (default 500), so the script ends inside 9 minutes whatever happens; a
# stopped run keeps the log of the epochs it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-200}
DEVICE=${DEVICE:-cuda}
TARBALL=${TARBALL:-.data/cifar10-jpg.tar.gz}
DATA=${DATA:-.data/cifar10}
OUTDIR=${OUTDIR:-${OUT:-results/gpu_repro}}
TIME_LIMIT=${TIME_LIMIT:-500}
RUNS=${RUNS:-"ce gbg"}    # any of: ce gbg random count features
EXTRA=${EXTRA:-}          # more train.py flags for every run, e.g. "--arch resnet8"
PY=${PYTHON:-python}      # every python step below runs under this interpreter
AMP=""
[ "$DEVICE" = cuda ] && AMP="--amp"

if [ ! -d "$DATA/train" ]; then
  [ -f "$TARBALL" ] || { echo "gpu_repro.sh: no data: $TARBALL is missing; put the CIFAR-10 JPEG tarball there (see README)" >&2; exit 2; }
  mkdir -p "$DATA" && tar xzf "$TARBALL" -C "$DATA"
fi

run() {  # run NAME FLAGS...: one training run, its wall time in wall.json
  local name=$1; shift
  local dir="$OUTDIR/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  local t0=$(date +%s.%N) rc=0
  timeout "$TIME_LIMIT" "$PY" train.py --dataset folder-lt --data-root "$DATA" --imb-factor 100 \
      --epochs "$EPOCHS" --batch-size 256 --device "$DEVICE" $AMP --workers 0 --print-freq 1000 \
      --output-dir "$dir" $EXTRA "$@" > "$dir/stdout.txt" 2>&1 || rc=$?
  local t1=$(date +%s.%N)
  "$PY" -c "import json,sys; json.dump({'run': sys.argv[1], 'wall_s': float(sys.argv[3]) - float(sys.argv[2]), 'exit_code': int(sys.argv[4]), 'flags': sys.argv[5:]}, open(sys.argv[1] + '/wall.json', 'w'))" \
      "$dir" "$t0" "$t1" "$rc" "$@"
  rm -f "$dir/checkpoint.pth" "$dir/checkpoint.prev.pth"
  echo "$name: exit $rc, $("$PY" -c "import json; print(round(json.load(open('$dir/wall.json'))['wall_s'], 1))") s"
}

declare -A FLAGS=(
  [ce]="--grouping none --moo none --sampler random"
  [gbg]="--grouping gbg --moo mgda --sampler gac"
  [random]="--grouping random --moo mgda --sampler gac"
  [count]="--grouping count --moo mgda --sampler gac"
  [features]="--grouping gbg --moo mgda --moo-grad features --sampler gac"
)
for name in $RUNS; do
  run "$name" ${FLAGS[$name]} &
done
wait
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUTDIR/gpu.txt" 2>/dev/null || echo cpu > "$OUTDIR/gpu.txt"
for name in $RUNS; do
  "$PY" -c "import json; r=json.load(open('$OUTDIR/$name/results.json'))['last']; print('$name', {k: round(v, 2) for k, v in r.items() if v is not None})" 2>/dev/null \
    || echo "$name: no results.json (see $OUTDIR/$name/stdout.txt)"
done
