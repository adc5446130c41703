#!/usr/bin/env bash
# One device call for issue 27: a 2-epoch smoke test of both rows on CUDA (grouping and MGDA at
# epoch 0, the diagnostic every epoch), then the paper's CE and CE+GBG+MOO rows with what is left.
set -u
export PYTHONUNBUFFERED=1
W=/tmp/gpu; mkdir -p $W
PY=python3
pack() { tar czf $OUT/gpu.tgz -C $W . ; ls -la $OUT; }
{ echo "commit $(cat .data/commit.txt)"; nvidia-smi; nproc; free -g;
  $PY -c "import torch,torchvision,numpy,scipy,sys;print(sys.version);print(torch.__version__, torchvision.__version__, numpy.__version__, scipy.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version())"; } > $W/env.txt 2>&1
cat $W/env.txt
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > $W/smi.csv 2>&1 &
timeout 170 $PY tests/repro.py --runs ce,gbg --epochs 2 --extra "--group-epoch 0 --diag-every 1" --budget 160 --out $W/smoke > $W/smoke.txt 2>&1
rc=$?
tail -25 $W/smoke.txt
echo "smoke rc=$rc at ${SECONDS}s"
if [ $rc -ne 0 ] || ! grep -q "gbg_s0: exit 0" $W/smoke.txt || ! grep -q "ce_s0: exit 0" $W/smoke.txt; then
  for f in $W/smoke/*/stdout.txt; do echo "== $f"; tail -40 $f; done
  pack; exit 1
fi
B=$((565 - SECONDS))
echo "full run budget ${B}s"
timeout $((B + 15)) $PY tests/repro.py --runs ce,gbg --budget $B --extra "--diag-every 10" --out $W/gpu_cifar10 > $W/full.txt 2>&1
echo "full rc=$? at ${SECONDS}s"
tail -30 $W/full.txt
for f in $W/gpu_cifar10/*/stdout.txt; do echo "== $f"; tail -5 $f; done
pack
