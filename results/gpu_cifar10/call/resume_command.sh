# The third device call (the machine still warm, /tmp/gpu kept from the call before): gbg_s0,
# stopped by repro.py's budget after epoch 83, resumed from its checkpoint by train.py with the
# same flags, under a 365 s limit (the session's device time). It ended during epoch 188.
export PYTHONUNBUFFERED=1; D=/tmp/gpu/gpu_cifar10/gbg_s0
timeout 365 python3 train.py --dataset folder-lt --data-root /work/main/.data/cifar10 --imb-factor 100 --arch resnet32 \
    --epochs 200 --batch-size 256 --device cuda --amp --workers 0 --print-freq 1000 --seed 0 --output-dir $D \
    --grouping gbg --moo mgda --sampler gac --diag-every 10 > $D/stdout_resume.txt 2>&1
# Epochs 188-199 on this project's CPU machine (2-core Intel Xeon, AVX-512 BF16), same commit, same flags
# but the device and the data root (the same files), 1 thread:
#   OMP_NUM_THREADS=1 python train.py ... --device cpu --data-root /tmp/cifar10data/cifar10 --print-freq 10 \
#       --output-dir runs/gpu_cifar10/gbg_s0 > runs/gpu_cifar10/gbg_s0/stdout_cpu_finish.txt
