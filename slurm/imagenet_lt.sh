#!/usr/bin/env bash
# The paper's ImageNet-LT runs (Li et al., AAAI 2024, Tables 2, 4, 5: 57.6 / 58.7 top-1):
# BCL + GBG with 4 groups, MGDA and the GAC sampler, global batch 256, ResNet-50 and
# ResNeXt-50. The rest of the recipe is train.py's imagenet-lt recipe (90 epochs, lr 0.1 cosine, no warm-up, wd 5e-4).
# Edit the variables and the lines below; flags added to this script reach both runs:
#   bash slurm/imagenet_lt.sh --dry-run              # show the sbatch scripts, submit nothing
#   bash slurm/imagenet_lt.sh --job-dir /shared/me/gbg_inet/%j
# BatchNorm: no --sync-bn. Each GPU normalises its own 32 images (x 3 views), as the releases'
# DataParallel runs normalise each GPU's share (BCL main.py l.118, GBG_v1 Group_main_full.py
# l.136; line numbers approximate); train.py averages the running statistics over the GPUs after
# every epoch. Add --sync-bn for statistics over the global batch (then the run equals one process).
# Cluster defaults: 8 GPUs per node (--gpus-per-node N, or --gres gpu:TYPE:N where the cluster
# wants a GPU type), 24 h limits (most partitions allow 24-48 h; the job is requeued before the
# limit and resumes), CPUs per task from the partition's nodes (sinfo), all of a node's memory
# (--mem-gb 0). Any other sbatch option: --slurm-opt KEY=VALUE (e.g. --slurm-opt exclusive).
set -euo pipefail
DATA_ROOT=/datasets/ImageNet_LT  # ImageNet_LT_{train,val,test}.txt and the images they list
PARTITION=gpu
cd "$(dirname "$0")/.."

python slurm/submit.py --dataset imagenet-lt --data-root "$DATA_ROOT" --arch resnet50 --loss bcl --batch-size 256 --num-groups 4 --grouping gbg --moo mgda --sampler gac --amp --nodes 1 --workers 8 --timeout 1440 --partition "$PARTITION" "$@"
python slurm/submit.py --dataset imagenet-lt --data-root "$DATA_ROOT" --arch resnext50_32x4d --loss bcl --batch-size 256 --num-groups 4 --grouping gbg --moo mgda --sampler gac --amp --nodes 1 --workers 8 --timeout 1440 --partition "$PARTITION" "$@"
# For CE as the base method (the paper's ablations), replace --loss bcl by --loss ce.
