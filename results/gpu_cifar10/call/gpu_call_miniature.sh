#!/usr/bin/env bash
# A device call for a whole ResNet-8 miniature table (prepared, not run yet): every row of ONE
# comparison side by side on the one GPU (tests/repro.py --jobs = the rows), bf16, 200 epochs, the
# CIFAR-10 JPEG copy at IF 100, so that its rows share a device and a precision. Run, after the
# GPU issue's own call if its session has device time left, with
#   run(command="bash results/gpu_cifar10/call/gpu_call_miniature.sh ce", carry=[".data"], timeout_s=590)
# where .data/ holds cifar10-jpg.tar.gz. Tables (first argument):
#   ce        CE's gain taken apart: ce, gbg, cb, avg, gbg_sample, ce_aug, gbg_aug, ce_ldam (seed 0;
#             results/README.md, the rows of tests/repro.py)
#   bcl       Table 6's BCL half: bcl, bcl_gbg, bcl_avg, bcl_moo (seeds 0, 1)
#   features  CE+GBG+MOO with --moo-grad features (seeds 0, 1), beside the "ce" table's gbg rows
# Rows start in that order and that order is their priority: repro.py stops the rows its measured
# pace says cannot end within the budget. A later call resumes: copy the returned folder into
# .data/gpu_miniature_<table>/ before it (the script goes on from there when it exists).
# Everything comes back in $OUT/gpu.tgz.
set -u
export PYTHONUNBUFFERED=1
T=${1:-ce}
case $T in
  ce) RUNS=ce,gbg,cb,avg,gbg_sample,ce_aug,gbg_aug,ce_ldam; SEEDS=0; EXTRA="" ;;
  bcl) RUNS=bcl,bcl_gbg,bcl_avg,bcl_moo; SEEDS="0 1"; EXTRA="" ;;
  features) RUNS=gbg; SEEDS="0 1"; EXTRA="--moo-grad features" ;;
  *) echo "gpu_call_miniature.sh: unknown table $T (ce, bcl or features)"; exit 2 ;;
esac
W=/tmp/gpu; mkdir -p $W
D=$W/gpu_miniature_$T
[ -d .data/gpu_miniature_$T ] && cp -r .data/gpu_miniature_$T $D  # an earlier call's runs: resumed
pack() { tar czf $OUT/gpu.tgz -C $W . ; ls -la $OUT; }
trap pack EXIT
{ git log -1 --format=%H 2>/dev/null || cat .data/commit.txt; nvidia-smi; nproc; free -g;
  python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.cuda.get_device_name())"; } > $W/env.txt 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > $W/smi_$T.csv 2>&1 &
B=$((570 - SECONDS))
echo "table $T: rows $RUNS, seeds $SEEDS, budget ${B}s"
timeout $((B + 20)) python3 tests/repro.py --arch resnet8 --runs $RUNS --seeds $SEEDS ${EXTRA:+--extra "$EXTRA"} \
    --no-gpu-check --budget $B --out $D > $W/call_$T.txt 2>&1
echo "repro rc=$? at ${SECONDS}s"
tail -30 $W/call_$T.txt
