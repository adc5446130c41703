#!/usr/bin/env bash
# The next device call (prepared, not run yet): the GPU check, the steps' cost (CE, exact, last,
# every-4, features) as ratios in one run, then the paper's BCL and BCL+GBG+MOO rows (Table 6:
# 84.07 / 85.05; BCL+GBG+MOO on train.py's BCL defaults, the group's sample mean since fb1c86d)
# with what is left of a 10-minute call. Run with
#   run(command="bash results/gpu_cifar10/call/gpu_call_bcl.sh", carry=[".data"], timeout_s=590)
# where .data/ holds cifar10-jpg.tar.gz (repro.py unpacks it). Everything comes back in $OUT/gpu.tgz;
# commit it under results/gpu_cifar10/ (bcl_s0, bcl_gbg_s0, check.txt, the call's output).
# A row repro.py plans out (its measured images/s too low for what is left) is not started; a row
# stopped by the budget keeps its checkpoint, and the same command in a later call resumes it
# (copy the folder back into .data/ first and pass --out to it).
set -u
export PYTHONUNBUFFERED=1
W=/tmp/gpu; mkdir -p $W
pack() { tar czf $OUT/gpu.tgz -C $W . ; ls -la $OUT; }
trap pack EXIT
{ git log -1 --format=%H 2>/dev/null || cat .data/commit.txt; nvidia-smi; nproc; free -g;
  python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.cuda.get_device_name())"; } > $W/env.txt 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > $W/smi.csv 2>&1 &
# the steps' cost on the GPU, ratios in one run (ResNet-32 batch 256 and ResNet-50 224 px), with nvidia-smi at 1 s
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > $W/smi_bench.csv 2>&1 &
SMI=$!
timeout 150 python3 tests/bench_gbg.py --only b,i --device cuda > $W/bench_steps_gpu.txt 2>&1
echo "bench rc=$? at ${SECONDS}s"; kill $SMI
# repro.py runs tests/gpu_check.py first on cuda (into $W/gpu_cifar10/gpu_check) and plans the rows
# from the images/s it measures
B=$((565 - SECONDS))
echo "budget ${B}s"
timeout $((B + 20)) python3 tests/repro.py --runs bcl,bcl_gbg --budget $B --out $W/gpu_cifar10 > $W/full.txt 2>&1
echo "repro rc=$? at ${SECONDS}s"
tail -40 $W/full.txt
