#!/usr/bin/env bash
# The paper's iNaturalist 2018 run (Li et al., AAAI 2024, Table 3: 71.9 top-1): BCL + GBG with 4
# groups, MGDA and the GAC sampler, global batch 256, ResNet-50. The rest of the recipe is train.py's inat2018
# recipe (100 epochs, lr 0.2 cosine, no warm-up, wd 1e-4). With 8,142 classes the class
# gradients for grouping are CountSketched to 16384 numbers each (train.py decides). One node of
# 8 GPUs; --nodes 2 halves the time (keep the global batch at 256).
# Edit the variables and the line below; flags added to this script reach the run:
#   bash slurm/inat2018.sh --dry-run                 # show the sbatch script, submit nothing
# BatchNorm: no --sync-bn. Each GPU normalises its own 32 images (x 3 views), as the releases'
# DataParallel runs normalise each GPU's share (BCL main.py l.118, GBG_v1 Group_main_full.py
# l.136; line numbers approximate); train.py averages the running statistics over the GPUs after
# every epoch. Add --sync-bn for statistics over the global batch (then the run equals one process).
# Cluster defaults: 8 GPUs per node (--gpus-per-node N, or --gres gpu:TYPE:N where the cluster
# wants a GPU type), 24 h limits (most partitions allow 24-48 h; the job is requeued before the
# limit and resumes), CPUs per task from the partition's nodes (sinfo), all of a node's memory
# (--mem-gb 0). Any other sbatch option: --slurm-opt KEY=VALUE (e.g. --slurm-opt exclusive).
set -euo pipefail
DATA_ROOT=/datasets/iNat2018  # iNaturalist18_{train,val}.txt and the images they list
PARTITION=gpu
cd "$(dirname "$0")/.."

python slurm/submit.py --dataset inat2018 --data-root "$DATA_ROOT" --arch resnet50 --loss bcl --batch-size 256 --num-groups 4 --grouping gbg --moo mgda --sampler gac --amp --nodes 1 --workers 8 --timeout 1440 --partition "$PARTITION" "$@"
# For CE as the base method (the paper's ablations), replace --loss bcl by --loss ce.
