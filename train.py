"""Train a long-tailed classifier with GBG (Li et al., AAAI 2024), on one GPU, the CPU, or
several processes under torch.distributed (torchrun, or slurm/submit.py through submitit).

    python train.py                                   # CIFAR-10-LT IF 100, ResNet-32, CE+GBG+MOO, GAC
    python train.py --loss bcl                        # BCL+GBG+MOO (the paper's best numbers; see BCL)
    python train.py --dataset synthetic-lt --arch resnet8 --epochs 5 --warmup-epochs 1 --batch-size 64 \
        --output-dir runs/demo                        # README's CPU demo: about a minute on one core
    python train.py --preset release                  # the authors' released CIFAR configuration (see README)
    python train.py --eval --resume output/checkpoint.pth   # top-1 and Many/Medium/Few of a checkpoint

Stage 1 (at --group-epoch): class gradients of the current model -> affinity -> NCut groups.
Stage 2: every step, one loss per group, MGDA weights alpha, update along d = sum_i alpha_i g_i.
The output directory holds log.txt (a JSON line per epoch), groups.json, checkpoint.pth (written
atomically every epoch; a run started again with the same --output-dir resumes from it) and
results.json (the last epoch, the best-on-val and the best test epoch, each labelled).
"""
import argparse
import atexit
import contextlib
import ctypes
import datetime
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

if sys.version_info < (3, 10):  # data_lt's `X | None` annotations, evaluated at import, need 3.10
    sys.exit(f"train.py: error: Python >= 3.10 is needed (this is {sys.version.split()[0]}); see README")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data_lt
import gbg


# --- Defaults and arguments -----------------------------------------------------------------------
# Defaults. A flag left at None is filled by fill_defaults, first match wins: the command line,
# then --preset, then the data set's recipe (RECIPES), then BCL_BASE when the loss so settled is
# BCL, then BASE. Sources (line numbers approximate):
#   [paper]  Li et al., AAAI 2024, Sec. 4 (implementation details).
#   [ldam]   kaidic/LDAM-DRW, cifar_train.py: batch 128 (l.47), 200 epochs, 5 warm-up epochs,
#            lr x0.01 at 160 / x0.0001 at 180 (l.366-378): the CIFAR-LT subset protocol.
#   [gbg_v1] WickyLee1998/GBG_v1 @681e276, cifar_Group_full.py (the authors' CIFAR script) and
#            Group_main_full.py (its ImageNet-LT script).
#   [bcl]    FlamieZhu/Balanced-Contrastive-Learning @f72d070, main.py and README.md.
BASE = dict(
    imb_factor=100,           # [paper] Table 1 (IF 100 and 50) and Table 6 (IF 100)
    loss="ce",                # [paper] Table 6, the CE and CE+GBG+MOO rows (BCL: --loss bcl)
    normalize="l2",           # ours, see README "Fidelity" (raw gradients collapse; the paper's
                              # Eq. 11 has no normaliser, the release uses loss+)
    group_loss="class",       # [paper] Eq. 10: a group's gradient averages its classes' gradients
                              # (--loss bcl: sample, BCL_BASE)
    moo_update="scaled",      # ours: [paper] Eq. 12's Pareto descent direction, at the raw gradients' size
    moo_gram="all",           # MGDA's Gram over every parameter the group losses reach
    recalibrate_bn=True,      # ours, measured: see results/README.md "The MGDA step and the grouping"
    ncut_assign="kmeans",     # ours, measured: a lower NCut value (Eq. 9) than cluster_qr (the release's), see --ncut-assign
    bcl_group_loss="la",      # [bcl] main.py l.231: BCL's classification loss is logit-adjusted
    schedule="step", lr_drops=None,  # None: x0.1 at 80 % and x0.01 at 90 % of --epochs
    lr_gamma=0.1,             # [gbg_v1] cifar_Group_full.py l.422-434, adjust_lr: x0.1 at each drop
)
RECIPES = {
    # [paper] and [gbg_v1] cifar_Group_full.py l.48-60 (batch 256, lr 0.1, wd 5e-4), adjust_lr
    # l.422-434 (5 warm-up epochs, x0.1 after 160, x0.01 after 180) with [ldam]'s 200 epochs.
    "cifar": dict(arch="resnet32", epochs=200, lr=0.1, wd=5e-4, schedule="step", warmup_epochs=5),
    # [bcl] README.md l.40-45 (lr 0.1, 90 epochs, wd 5e-4, cosine) and main.py l.61 (warm-up 0);
    # [gbg_v1] Group_main_full.py l.71 has no warm-up either.
    "imagenet-lt": dict(arch="resnet50", epochs=90, lr=0.1, wd=5e-4, schedule="cosine", warmup_epochs=0),
    # [bcl] README.md l.59-64 (lr 0.2, 100 epochs, wd 1e-4, cosine) and main.py l.61 (warm-up 0)
    "inat2018": dict(arch="resnet50", epochs=100, lr=0.2, wd=1e-4, schedule="cosine", warmup_epochs=0),
}
# Under --loss bcl, between the recipe and BASE. group_loss: [gbg_v1] cifar_Group_full.py l.303 and
# Group_main_full.py l.343 average a group's loss over its samples (Alg. 2 line 3: L_i = L(theta; B_i)).
# BCL's loss is logit-adjusted already, a sample mean that targets the balanced error; Eq. 10's class
# means on top of it balance the classes twice: ResNet-8 on CIFAR-10-LT ended 4.22 points below BCL
# with them (results/cpu_resnet8_bcl), tracking BCL with sample means (results/cpu_resnet8_bcl_sample).
BCL_BASE = dict(group_loss="sample")
# --preset release: the authors' released CIFAR configuration, [gbg_v1] cifar_Group_full.py: BCL
# (l.70-71, 231-233), IF 50 (imb_factor 0.02, l.42), 300 epochs (l.44) with the fixed warm-up and
# drops of adjust_lr (l.422-434), shuffled batches without a sampler (l.218-222), group losses
# averaged over the group's samples with plain CE (l.231-232, 303, 318), MGDA on "loss+"-normalised
# gradients (l.536) whose weights then scale the raw losses (l.315-322), Gram over the backbone
# only (l.514), grouping on the initial model's raw eval-mode outputs (utils.py l.70-133) by
# scikit-learn's spectral_clustering(cos + 1, assign_labels="cluster_qr") (utils.py l.147; its
# Laplacian ignores the diagonal, so the graph is gbg's, no self-loops). It reports the best test
# epoch (l.252-260): results.json's best_test.
RELEASE = dict(loss="bcl", imb_factor=50, epochs=300, lr=0.1, wd=5e-4, schedule="step", warmup_epochs=5,
               lr_drops=[160, 180], sampler="random", group_loss="sample", bcl_group_loss="ce",
               normalize="loss+", moo_update="raw", moo_gram="backbone", recalibrate_bn=False, group_epoch=0,
               ncut_assign="cluster_qr")
# --preset paper: the method as the paper's text describes it, where our defaults differ from it
# (README, "Fidelity"): alpha on the raw gradients (Eq. 11 has no
# normaliser), grouping on the initial model's eval-mode outputs as they are (Alg. 1), group
# losses as Eq. 10's class means under BCL too.
PAPER = dict(normalize="none", recalibrate_bn=False, group_epoch=0, group_loss="class")
PRESETS = {"release": RELEASE, "paper": PAPER}


def default_workers():
    """DataLoader workers: the cores this process may use (SLURM's --cpus-per-task, taskset), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


def num_groups_arg(text):
    """--num-groups: an int (checked >= 1 in fill_defaults) or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor auto") from None


# --num-groups auto: G when the spectrum shows no group structure (gbg.choose_num_groups): 4, the
# paper's best number of groups (Fig. 4) and the release's --n_groups.
AUTO_FALLBACK_GROUPS = 4


DATASETS = data_lt.DATASETS


def default_help(key, text=""):
    """A flag's help ending in the default fill_defaults gives it, read from the tables it reads
    (RECIPES and BCL_PRESETS per data set, BASE, PRESETS), so that --help cannot drift from them."""
    shown = lambda v: ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    by_value = {}
    for ds in DATASETS:
        tables = (RECIPES.get(ds, RECIPES["cifar"]), BCL_PRESETS.get(ds, BCL_PRESETS["cifar"]), BASE)
        value = next(t[key] for t in tables if key in t)
        by_value.setdefault(shown(value), []).append(ds)
    (usual, _), *others = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
    default = ", ".join([f"{v} for {' and '.join(ds)}" for v, ds in others]
                        + [f"{usual} otherwise" if others else usual])
    presets = "".join(f"; --preset {name}: {shown(preset[key])}" for name, preset in sorted(PRESETS.items())
                      if key in preset)
    return f"{text}{' ' if text else ''}(default: {default}{presets})"


class HelpFormatter(argparse.HelpFormatter):
    """--help shows the default of every flag whose text does not already give it."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: 0 == False, and --seed 0's default would go unsaid
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.default == [] or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def get_args_parser(add_help=False):
    """train.py's parser (add_help=False: to extend it with parents=[...], as the tests do)."""
    p = argparse.ArgumentParser(prog="train.py", add_help=add_help, formatter_class=HelpFormatter,
                                usage="python %(prog)s [--dataset NAME] [--epochs N] ... (the flags below)",
                                description=__doc__.split("\n\n")[0])
    add_train_arguments(p)
    return p


def add_train_arguments(p):
    """train.py's flags, the most used first, then the rest by topic (slurm/submit.py adds them
    after its cluster flags)."""
    c = p.add_argument_group("most used")
    c.add_argument("--dataset", default="cifar10-lt", choices=DATASETS,
                   help="the long-tailed data set; folder-lt: any image tree DATA_ROOT/train/<class>/*, "
                        "DATA_ROOT/test/<class>/* (the same class folders; train cut long-tailed like CIFAR); "
                        "synthetic-lt is made in memory (README's CPU demo: about a minute on one core)")
    c.add_argument("--data-root", default=None,
                   help="folder holding the data set: CIFAR's python files (downloaded when absent), ImageNet-LT's or "
                        "iNat's images and split files, folder-lt's train/ and test/ class folders; see README "
                        "(default: ./data; with --eval the checkpoint's)")
    c.add_argument("--arch", default=None, choices=["resnet32", "resnet20", "resnet8", "resnet50", "resnext50_32x4d"],
                   help=default_help("arch", "resnet8/20: smaller CIFAR ResNets, for quick checks and the tests"))
    c.add_argument("--loss", default=None, choices=["ce", "bcl"],
                   help=default_help("loss", "ce, or bcl: logit-adjusted CE + balanced contrastive loss (Zhu et al. "
                                           "2022), three views"))
    c.add_argument("--epochs", type=int, default=None, help=default_help("epochs"))
    c.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, shared by all processes; 256 as the release and BCL")
    c.add_argument("--lr", type=float, default=None, help=default_help("lr"))
    c.add_argument("--output-dir", default="output",
                   help="where log.txt, groups.json, checkpoint.pth and results.json go; a run started again "
                        "with the same folder resumes from its checkpoint (without one it starts afresh and "
                        "removes an earlier run's log.txt, groups.json and results.json)")
    c.add_argument("--grouping", default="gbg", choices=["gbg", "random", "count_bins", "count", "none"],
                   help="random, count_bins: Table 5's baselines (count_bins: Li et al. 2020's bins of 10, 100, "
                        "1000 training images, G = the bins used; count: G near-equal groups by count, ours); "
                        "none with --moo mgda makes every class its own objective")
    c.add_argument("--moo", default="mgda", choices=["mgda", "none"],
                   help="none: average the group losses (the paper's 'GBG' ablation)")
    c.add_argument("--num-groups", type=num_groups_arg, default=4,
                   help="G (4: the paper's ablations, the release's --n_groups), or auto: read from the spectrum "
                        "of the affinity at the first grouping (gbg.choose_num_groups; 4 when it shows no group "
                        "structure), then kept for the run (--grouping gbg only)")
    c.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    c.add_argument("--amp", action="store_true",
                   help="bf16 autocast and channels_last, on CUDA and on CPUs with bf16 support")
    c.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="release: the authors' CIFAR configuration; paper: the paper's text where our defaults "
                        "differ (see README); explicit flags still win")
    c.add_argument("--seed", type=int, default=0, help="training seed (init, sampler, augmentation, grouping)")
    d = p.add_argument_group("data")
    d.add_argument("--imb-factor", type=float, default=None,
                   help=default_help("imb_factor", "N_max / N_min of the made-long-tailed sets"))
    d.add_argument("--data-seed", type=int, default=0,
                   help="seed of the long-tailed subset (CIFAR, folder-lt; synthetic-lt's images): fixed across "
                        "runs, as LDAM-DRW, BCL and the authors' release do; --seed varies the training only")
    d.add_argument("--augment", default=None, choices=["crop-flip", "release"],
                   help="the training view of the classification loss: crop-flip, RandomCrop(32, pad 4) + flip "
                        "(LDAM-DRW's cifar_train.py transform_train, default with --loss ce); release, the "
                        "authors' CIFAR view, crop-flip + AutoAugment CIFAR10 policy + Cutout 16 px (GBG_v1 "
                        "cifar_Group_full.py l.168-176; BCL's classification view, the only one with --loss bcl). "
                        "release needs CIFAR-sized images held as one tensor (cifar10-lt, cifar100-lt, folder-lt "
                        "of small images); made where --views says. On imagenet-lt and inat2018 the value names "
                        "the 224-px view: crop-flip, RandomResizedCrop + flip (--loss ce); release, BCL's views "
                        "(data_lt.bcl_views, --loss bcl)")
    d.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: the cores this process may use, at most 8)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--wd", type=float, default=None, help=default_help("wd"))
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--schedule", default=None, choices=["step", "cosine"],
                   help=default_help("schedule", "step: x --lr-gamma (0.1) at each of --lr-drops (by default at "
                                                  "80%% and 90%% of the epochs, 160/180 of 200)"))
    o.add_argument("--lr-drops", type=int, nargs="+", default=None,
                   help="step schedule: epochs at which lr drops x --lr-gamma (default: 80%% and 90%% of --epochs, "
                        "160 180 of 200; --preset release: 160 180)")
    o.add_argument("--lr-gamma", type=float, default=None,
                   help="step schedule: the factor of each drop (default: 0.1). 0.1: the release's adjust_lr (GBG_v1 "
                        "cifar_Group_full.py l.422-434: x0.1 after 160, x0.01 after 180); 0.01: LDAM-DRW's "
                        "adjust_learning_rate (cifar_train.py l.366-378: x0.01 after 160, x0.0001 after 180)")
    o.add_argument("--warmup-epochs", type=float, default=None, help=default_help("warmup_epochs"))
    g = p.add_argument_group("GBG: the grouping (Algorithm 1)")
    g.add_argument("--max-groups", type=int, default=None,
                   help="--num-groups auto: the largest G it may choose (default min(8, classes // 2): 8 is twice "
                        "the paper's best G, and the exact MGDA step costs a backward pass per group; beyond "
                        "classes / 2 most groups would be single classes; see results/README.md)")
    g.add_argument("--group-epoch", type=int, default=None,
                   help="epoch at which to group (default: the end of the lr warm-up, 5 on CIFAR, or 0 when the run "
                        "is not longer than its warm-up; 0: the initial model, as the paper and the release)")
    g.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help=default_help("recalibrate_bn", "re-estimate BatchNorm statistics on the grouping samples "
                                                       "before the class gradients (restored afterwards); "
                                                       "--no-recalibrate-bn: the release's eval-mode pass"))
    g.add_argument("--ncut-assign", default=None, choices=list(gbg.NCUT_ASSIGN),
                   help="how NCut turns the spectral embedding into groups: kmeans (default: unit rows, seeded "
                        "k-means, 10 restarts, the lowest cost kept) or cluster_qr (the release, utils.py l.147: "
                        "scikit-learn's QR-pivoting assignment, no seed; --preset release). K-means stays the "
                        "default: on 480 synthetic affinities it reached the lower NCut value 217 times, "
                        "cluster_qr 26 times, the same value 237 times (results/graph_self_loops/README.md)")
    g.add_argument("--regroup-every", type=int, default=0,
                   help="regroup every N epochs (0: never); how far the groups moved (adjusted Rand index) is in "
                        "groups.json's history and log.txt's regroup_ari")
    g.add_argument("--sketch-dim", type=int, default=0,
                   help="CountSketch size of the class gradients (0: exact when K*P floats fit in 2 GB, else 16384)")
    g.add_argument("--grad-max-per-class", type=int, default=None,
                   help="cap on samples per class for grouping (default: none, every training sample)")
    s = p.add_argument_group("GBG: the step (Algorithm 2) and its batches")
    s.add_argument("--moo-grad", default="exact", choices=["exact", "last", "features"],
                   help="exact: one backward per group over the whole network (Alg. 2); last: the group "
                        "backwards stop at the last stage (Gram there), then one full backward of sum w_i L_i; "
                        "features: MGDA-UB (Sener & Koltun 2018, Sec. 3.3), the group backwards stop at the "
                        "backbone's output z, the Gram over [dL_i/dz, dL_i/d(classifier)] (--moo-gram backbone: z "
                        "alone, which GBG's disjoint groups make diagonal: alpha_i ~ 1/|dL_i/dz|^2 under --normalize none, "
                        "1/G under l2), then one "
                        "full backward of sum w_i L_i; the exact min-norm value is <= max(||dz/dtheta||^2, 1) x "
                        "this one's (gbg.mgda_backward_features)")
    s.add_argument("--moo-gram", default=None, choices=["all", "backbone"],
                   help=default_help("moo_gram", "parameters of MGDA's Gram: all that the group losses reach, or the "
                                                 "backbone only (the release); the update reaches every parameter "
                                                 "either way"))
    s.add_argument("--moo-update", default=None, choices=["scaled", "raw", "normalized"],
                   help=default_help("moo_update", "scaled: d = convex combination of the raw g_i with weights "
                                                   "proportional to alpha_i/n_i (Pareto descent, gradient-sized); raw: "
                                                   "alpha applied to the raw g_i (the release, no descent guarantee); "
                                                   "normalized: d = sum alpha_i g_i/n_i (|d| <= 1 under l2)"))
    s.add_argument("--moo-every", type=int, default=1,
                   help="solve for the weights every k steps (and when the groups present change); in "
                        "between, one backward of sum w_i L_i with the last weights")
    s.add_argument("--normalize", default=None, choices=["none", "l2", "loss", "loss+"],
                   help=default_help("normalize", "normaliser n_i of the group gradients when solving for alpha: "
                                                  "norm (l2), loss, or both (loss+); none: the paper's Eq. 11"))
    s.add_argument("--group-loss", default=None, choices=["class", "sample"],
                   help="class: a group's loss is the mean of its classes' mean losses (the paper's Eq. 10; "
                        "default with --loss ce); sample: the mean over its samples (the release's, Alg. 2's "
                        "L(theta; B_i); default with --loss bcl, whose logit-adjusted loss class means would "
                        "balance twice: 4.2 points below BCL on CIFAR-10-LT, ResNet-8)")
    s.add_argument("--class-balanced", action="store_true",
                   help="with --grouping none --moo none: every class its own group, the groups averaged with "
                        "equal weights, so the batch loss is the mean over the batch's classes of their mean "
                        "losses (class-balanced CE: the re-balancing of Eq. 10 without groups or MGDA). Without "
                        "it, --grouping none --moo none trains on the batch's sample mean")
    s.add_argument("--sampler", default=None, choices=["random", "gac"],
                   help="default: gac with groups, plain shuffled batches with --grouping none (every class its "
                        "own objective: the paper's MOO row, where tail objectives are often absent)")
    s.add_argument("--gac-fill", type=float, default=0.1,
                   help="GAC top-up per missing group, as a fraction of the global batch (0.1: the paper, Sec. "
                        "'Method', '1/10 of the batch size')")
    s.add_argument("--ratio-every", type=int, default=10,
                   help="every N MGDA steps, one extra backward measures |d| / |gradient of the sample-mean "
                        "loss| (log.txt: update_ratio); 0: off")
    b = p.add_argument_group("BCL (--loss bcl)")
    b.add_argument("--la-weight", type=float, default=None,
                   help=default_help("la_weight", "weight of the logit-adjusted CE"))
    b.add_argument("--bcl-weight", type=float, default=None,
                   help=default_help("bcl_weight", "weight of the contrastive loss"))
    b.add_argument("--bcl-temp", type=float, default=None,
                   help=default_help("bcl_temp", "temperature of the contrastive loss"))
    b.add_argument("--bcl-group-loss", default=None, choices=["la", "ce"],
                   help=default_help("bcl_group_loss", "under grouping, the group losses are logit-adjusted CE (la) or "
                                                       "plain CE (ce, the authors' CIFAR release)"))
    b.add_argument("--views", default=None, choices=["device", "workers"],
                   help="BCL, and --augment release: where the views are made: device (default for CIFAR-sized "
                        "data held as one tensor; batched on --device, this project's choice, same transforms) or "
                        "workers (per sample in DataLoader workers; always for image files)")
    x = p.add_argument_group("diagnostics")
    x.add_argument("--diag-every", type=int, default=0,
                   help="every N epochs, on --diag-batches fixed training batches (no augmentation), the cosine "
                        "between each class's gradient and the step's update direction, the paper's Fig. 2; "
                        "log.txt: diag_cos and diag_ratio per class, diag_cos_many/medium/few. Changes nothing "
                        "in the training. 0 (default): off")
    x.add_argument("--diag-batches", type=int, default=4,
                   help="how many fixed batches --diag-every averages over (drawn once by the run's own "
                        "sampler, GAC or random, with a fixed seed)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=1,
                   help="evaluate on the test (and val) split every N epochs, and after the last")
    r.add_argument("--print-freq", type=int, default=0,
                   help="steps between progress lines (0: about ten lines an epoch)")
    r.add_argument("--eval", action="store_true", help="with --resume PATH: evaluate that checkpoint and exit")
    r.add_argument("--resume", default=None, metavar="PATH",
                   help="the checkpoint --eval evaluates (default: none; a training run resumes from --output-dir "
                        "by itself)")
    r.add_argument("--exit-after-epoch", type=int, default=None,
                   help="stop (as if killed) once this epoch's checkpoint is written; for tests (default: none)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone for the training steps (grouping and evaluation stay eager); "
                        "measured on the CPU: steps 1.3-1.6x faster after 1-2.5 min of compiling (results/README.md)")
    r.add_argument("--deterministic", action="store_true",
                   help="runs that repeat bit for bit on CUDA too: deterministic algorithms, cuDNN benchmark off, "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8, TF32 off (README, 'What exact means'); CPU runs are "
                        "bit-identical without it")
    r.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over the global batch (without it, each process normalises its own "
                        "share and the running statistics are averaged over the processes after every epoch)")
    return p


EVAL_NEEDS_RESUME = ("--eval and --resume PATH go together (evaluate that checkpoint); a training run resumes by "
                     "itself from checkpoint.pth in --output-dir")


def fill_defaults(args):
    """Fill the flags left at None (command line > --preset > data set recipe > BCL_BASE under BCL >
    BASE) and check the flags, each with one line naming the flag and the fix."""
    if args.preset == "release" and args.dataset not in ("cifar10-lt", "cifar100-lt"):
        raise data_lt.UserError(f"--preset release is the authors' CIFAR configuration; use it with --dataset "
                                f"cifar10-lt or cifar100-lt (not {args.dataset})")
    step_flags = [k for k in ("lr_drops", "lr_gamma") if getattr(args, k) is not None]  # from the command line
    schedule_given = args.schedule is not None
    layers = [PRESETS.get(args.preset, {}), RECIPES.get(args.dataset, RECIPES["cifar"])]
    loss = next((layer["loss"] for layer in [vars(args), *layers, BASE] if layer.get("loss")), None)
    layers += [BCL_BASE if loss == "bcl" else {}, BASE]  # the loss as the layers above settle it
    for layer in layers:
        for k, v in layer.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.sampler is None:  # every class its own objective: plain batches (see --sampler)
        args.sampler = "random" if args.grouping == "none" else "gac"
    if args.augment is None:  # BCL's classification view is the release's (data_lt.bcl_views)
        args.augment = "release" if args.loss == "bcl" else "crop-flip"
    if args.workers is None:
        args.workers = default_workers()
    if args.data_root is None:  # torchvision downloads CIFAR here (README, Quick start)
        args.data_root = "./data"
    if args.grouping == "count_bins":  # G: the number of Li et al.'s count bins the classes fill
        if args.num_groups not in ("bins", get_args_parser().get_default("num_groups")):
            raise data_lt.UserError(f"--grouping count_bins makes one group per count bin the classes fill (Li et al. "
                                    f"2020); drop --num-groups {args.num_groups}, or use --grouping count")
        args.num_groups = "bins"
    if args.group_epoch is None:
        # Ours, measured (results/README.md, "Grouping on outputs that mean something"): groups taken at the
        # end of the warm-up agree across seeds (adjusted Rand 0.66), those of the initial model
        # hardly (0.14 recalibrated, -0.02 not). A run no longer than its warm-up groups at once.
        warm = math.ceil(args.warmup_epochs)
        args.group_epoch = warm if warm < args.epochs else 0
    not_finite = [k for k, v in vars(args).items() if isinstance(v, float) and not math.isfinite(v)]
    if not_finite:  # nan compares False with everything, so the range checks below would let it through
        raise data_lt.UserError(f"{as_flag(not_finite[0], getattr(args, not_finite[0]))} is not a number a run "
                                f"can use; give a finite value")
    checks = [
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: give a positive batch size (the global batch)"),
        (args.batch_size % args.world_size == 0,
         f"--batch-size {args.batch_size} does not split over the {args.world_size} processes; "
         f"pick a positive multiple of {args.world_size}"),
        (args.epochs >= 1, f"--epochs {args.epochs} must be at least 1"),
        (args.seed >= 0 and args.data_seed >= 0,
         f"--seed {args.seed} and --data-seed {args.data_seed} must be >= 0 (numpy's and the views' seeds)"),
        (args.lr > 0, f"--lr {args.lr} must be positive"),
        (args.wd >= 0 and args.momentum >= 0, f"--wd {args.wd} and --momentum {args.momentum} must be >= 0"),
        (args.warmup_epochs >= 0, f"--warmup-epochs {args.warmup_epochs} must be >= 0"),
        (args.lr_drops is None or (min(args.lr_drops) > 0 and list(args.lr_drops) == sorted(args.lr_drops)),
         f"--lr-drops {args.lr_drops}: give positive epochs in increasing order, e.g. --lr-drops 160 180"),
        (args.lr_gamma > 0, f"--lr-gamma {args.lr_gamma} must be positive (0.1: x0.1 at each drop)"),
        (args.schedule == "step" or not step_flags,
         f"{' and '.join(as_flag(k, getattr(args, k)) for k in step_flags)} "
         f"{'shape' if len(step_flags) > 1 else 'shapes'} the step schedule; this run's "
         f"schedule is cosine{'' if schedule_given else f' (the {args.dataset} recipe)'}: drop "
         f"{'them' if len(step_flags) > 1 else 'it'}, or pass --schedule step"),
        (args.eval or args.loss == "bcl" or args.augment == "crop-flip" or args.dataset not in ("imagenet-lt", "inat2018"),
         f"--augment release is the authors' CIFAR view (AutoAugment CIFAR10 policy, Cutout 16 px); {args.dataset} "
         f"is read from image files at 224 px: drop --augment release"),
        (args.eval or args.loss == "ce" or args.augment == "release",
         "--loss bcl's classification view is the release's (AutoAugment + Cutout, data_lt.bcl_views); drop "
         "--augment crop-flip"),
        (args.eval or not args.class_balanced or (args.grouping == "none" and args.moo == "none"),
         f"--class-balanced makes every class its own group with equal weights; it goes with --grouping none "
         f"--moo none (with --grouping {args.grouping} --group-loss class averages class means inside each group, "
         f"with --moo mgda every class is its own objective already): drop it, or pass --grouping none --moo none"),
        (args.num_groups in ("auto", "bins") or args.num_groups >= 1, f"--num-groups {args.num_groups} must be at least 1"),
        (args.num_groups != "auto" or args.grouping in ("gbg", "none"),
         f"--num-groups auto reads G from the class-gradient affinity, which --grouping {args.grouping} does not "
         f"compute: give --num-groups N, or use --grouping gbg"),
        (args.max_groups is None or args.num_groups == "auto",
         "--max-groups bounds --num-groups auto only: drop it, or pass --num-groups auto"),
        (args.max_groups is None or args.max_groups >= 2,
         f"--max-groups {args.max_groups} must be at least 2 (with 1 group there is nothing to choose)"),
        (args.group_epoch >= 0 and args.regroup_every >= 0,
         "--group-epoch and --regroup-every must be >= 0 (0: group at the start, never regroup)"),
        (args.eval or args.grouping == "none" or args.group_epoch < args.epochs,
         f"--group-epoch {args.group_epoch} is not before the run's last epoch (--epochs {args.epochs}): the run "
         f"would never group and train plain CE throughout; give --group-epoch {args.epochs - 1} or less, more "
         f"--epochs, or --grouping none"),
        (0 < args.gac_fill <= 1, f"--gac-fill {args.gac_fill} must be in (0, 1], a fraction of the batch"),
        (args.sketch_dim >= 0, f"--sketch-dim {args.sketch_dim} must be >= 0 (0: decided from the model size)"),
        (args.grad_max_per_class is None or args.grad_max_per_class >= 1,
         f"--grad-max-per-class {args.grad_max_per_class} must be at least 1 (or left out: every sample)"),
        (args.eval_every >= 1 and args.print_freq >= 0,
         "--eval-every must be at least 1 and --print-freq >= 0 (0: about ten progress lines an epoch)"),
        (args.moo_every >= 1 and args.ratio_every >= 0,
         "--moo-every must be at least 1 (1: solve every step) and --ratio-every >= 0 (0: off)"),
        (args.workers >= 0, f"--workers {args.workers} must be >= 0"),
        (args.diag_every >= 0 and args.diag_batches >= 1,
         "--diag-every must be >= 0 (0: off) and --diag-batches at least 1"),
        (args.diag_every == 0 or args.loss == "ce",
         "--diag-every measures the cross-entropy step; use it with --loss ce (BCL's views are random)"),
        (args.eval == (args.resume is not None), EVAL_NEEDS_RESUME),
        (not args.compile or compile_supported(),
         f"--compile needs torch >= 2.6 (torch.compiler.set_stance, torch._functorch.config.donated_buffer); "
         f"this is torch {torch.__version__}: upgrade torch or drop --compile"),
        (not (args.compile and args.moo_grad == "last"),
         "--moo-grad last with --compile: the compiled backbone's backward is one autograd node, so the "
         "partial backwards would run the whole backbone; drop --compile or use --moo-grad exact"),
    ]
    for ok, message in checks:
        if not ok:
            raise data_lt.UserError(message)


# --- Models ---------------------------------------------------------------------------------------
# ResNet-32 for CIFAR (He et al. 2016, option-A shortcuts), torchvision's ResNet-50 and
# ResNeXt-50 for ImageNet-LT / iNat. Every model is backbone -> features z -> fc, so that the
# backbone is what class gradients are taken over and z is what MGDA-UB differentiates.
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option A: subsample and zero-pad the channels, no parameters
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class Net(nn.Module):
    def __init__(self, backbone, feat_dim, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feat_dim, num_classes)
        nn.init.kaiming_normal_(self.fc.weight)

    def forward_features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.fc(self.backbone(x))


def build_model(arch, num_classes):
    if arch in ("resnet8", "resnet20", "resnet32"):  # depth 6n + 2
        return Net(CifarResNet((int(arch[6:]) - 2) // 6), 64, num_classes)
    backbone = getattr(torchvision.models, arch)(weights=None)
    feat_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return Net(backbone, feat_dim, num_classes)


# --- Distributed helpers and output ---------------------------------------------------------------
# No DDP wrapper, since the GBG step takes several gradients per step; instead every process adds
# up the same sums, so all apply the update of the global batch. Rank 0 alone writes files.
# How long a process waits in a collective before the run is ended. Rank 0 alone builds the
# affinity, solves the NCut and (--num-groups auto) the permutation test while the others wait
# in a broadcast: at iNaturalist scale choose_num_groups alone took 384 s (bench (h)), near
# NCCL's default of 10 minutes. One hour covers that; a hung collective is reported after it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=1)
def init_distributed(args):
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.world_size > 1 and args.device.startswith("cuda:"):
        raise data_lt.UserError(f"--device {args.device} under torchrun or srun would put all {args.world_size} "
                                f"processes on one GPU; pass --device cuda (each process takes the GPU of its "
                                f"LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if args.device == "cuda" and args.world_size > 1:
        if torch.cuda.device_count() == 0:
            raise data_lt.UserError("--device cuda, but this process sees no GPU; check CUDA_VISIBLE_DEVICES and "
                                    "the job's GPU request, or pass --device cpu")
        # One GPU per process. A cluster may show each task all of the node's GPUs, one, or a
        # subset (srun --gpu-bind=closest: those of its socket); local_rank modulo what the task
        # sees picks its own in each case (as DeiT's and DINO's init_distributed_mode).
        gpu = args.local_rank % torch.cuda.device_count()
        args.device = f"cuda:{gpu}"
        torch.cuda.set_device(gpu)
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        # without this, gloo's threads can outlive the interpreter and abort the process at exit
        atexit.register(dist.destroy_process_group)
    args.distributed = args.world_size > 1


def keep_freed_memory():
    """On the CPU with glibc: keep freed memory in the process. By default glibc hands large freed
    blocks back to the kernel and maps fresh zeroed pages for the next allocation; an exact MGDA
    step allocates and frees a backward pass's buffers G times, so page faults cost it ~15 %
    (bench (b): the exact step at 1.16x its floor of 1 forward + G backwards, 1.01x with this;
    the CE step 8 % faster too). Returns whether it took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 25))
    except (OSError, AttributeError):
        return False


def is_main(args):
    return args.rank == 0


def all_reduce_(t):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def average_bn_buffers(model, args):
    """Without --sync-bn each process's BatchNorm running statistics follow its own share of the
    batches. Average them over the processes (after every epoch, before evaluation, grouping and
    the checkpoint), so that every process evaluates and groups with the model that is saved."""
    if not args.distributed:
        return
    bufs = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]
    if bufs:
        flat = all_reduce_(torch.cat([b.reshape(-1) for b in bufs])) / args.world_size
        for b, chunk in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(chunk.view_as(b))


class SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a backward: each rank's loss depends on the sum, so the gradient
    w.r.t. a rank's input is the sum over ranks of the gradients w.r.t. the sum."""

    @staticmethod
    def forward(ctx, t):
        return all_reduce_(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over the batches of all processes, for inputs
    [N, C, ...] of any rank (BatchNorm1d and 2d alike, as nn.SyncBatchNorm). nn.SyncBatchNorm only
    runs on GPUs; this one also runs on the CPU with gloo, through the differentiable all_reduce, so
    that the CPU tests check the multi-process run exactly (tests/test_cuda_paths.py: the batch
    norm of the whole batch, SyncBatchNorm's contract)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects an input [N, C, ...], got {x.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = SumOverRanks.apply(torch.cat([x.sum(dims), n_local]))
        n, mean = stats[-1], stats[:-1] / stats[-1]
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly in float32.
        var = SumOverRanks.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1), factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_bn(module, device):
    """--sync-bn: every BatchNorm (the BCL heads' BatchNorm1d included) made a synchronised one:
    nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere; the same modules either way."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module


def log(args, *msg):
    if is_main(args):
        print(*msg, flush=True)


def previous_checkpoint(path):
    """checkpoint.pth -> checkpoint.prev.pth: the one before, kept by save_atomic."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def replace_durably(path, write, keep_previous=False):
    """Write `path` through a temporary file: write(f) into it, fsync it, (keep_previous: keep the
    current file as checkpoint.prev.pth,) rename it into place and fsync the folder. A rename alone
    is not durable: after a node failure the file system may hold the new name with no data yet;
    with the fsyncs the data is on disk before the name points at it. A kill mid-write leaves the
    old file whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves
    finally:
        os.close(fd)


def save_atomic(obj, path):
    """A checkpoint written durably, the previous one kept as checkpoint.prev.pth: if the newest
    file is still unreadable after a node failure, every requeue would fail without it (see
    load_resume_checkpoint)."""
    replace_durably(path, lambda f: torch.save(obj, f), keep_previous=True)


def load_resume_checkpoint(ckpt_path, args):
    """(checkpoint, its path) to resume from, or (None, None) to start afresh; all processes get
    the same one.

    Rank 0 reads checkpoint.pth, falling back (with a warning) to checkpoint.prev.pth when the
    newest cannot be read, and broadcasts which file and epoch it took; the others read that file
    and check that they see the same epoch (a shared file system can show a node a stale file)."""
    candidates = [Path(ckpt_path), previous_checkpoint(ckpt_path)]
    choice, ckpt = torch.tensor([-1, -1], dtype=torch.long), None  # [file index, epoch]
    if is_main(args):
        failed = []
        for i, path in enumerate(candidates):
            if not path.exists():
                continue
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
                choice = torch.tensor([i, ckpt["epoch"]], dtype=torch.long)
                break
            except Exception as e:  # truncated, empty or corrupt: every kind of unreadable
                failed.append(f"{path} ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
                ckpt = None
        if failed and ckpt is not None:
            print(f"train.py: warning: cannot read {failed[0]}; resuming from {candidates[choice[0]]} "
                  f"(epoch {int(choice[1])}) instead", file=sys.stderr, flush=True)
        elif failed:
            choice[0] = -2
    if args.distributed:  # gloo takes CPU tensors, nccl device tensors
        on = torch.device(args.device) if dist.get_backend() == "nccl" else torch.device("cpu")
        choice = choice.to(on)
        dist.broadcast(choice, 0)
        choice = choice.cpu()
    index, epoch = int(choice[0]), int(choice[1])
    if index == -2:  # never start afresh over a run's checkpoints: that would overwrite them
        why = "; ".join(failed) if is_main(args) else "rank 0 could not read them"
        raise data_lt.UserError(f"no readable checkpoint in {Path(ckpt_path).parent}: {why}; move checkpoint*.pth "
                              f"away to start over, or restore one from a backup")
    if index < 0:
        return None, None
    if not is_main(args):
        ckpt = torch.load(candidates[index], map_location="cpu", weights_only=False)
        if ckpt["epoch"] != epoch:
            raise data_lt.UserError(f"rank {args.rank} reads epoch {ckpt['epoch']} from {candidates[index]} but "
                                  f"rank 0 read epoch {epoch}; the nodes see different files: put --output-dir "
                                  f"on a file system that every node sees the same")
    return ckpt, candidates[index]


# Resuming from checkpoint.pth: the flags that may differ from the checkpoint's, because they change
# how the run is carried out, not what it computes (where the data and outputs are, the device and
# the number of processes, which keep the global batch, the loaders, how often it prints, evaluates
# and measures, compiling, the tests' stop; --preset only fills the flags, which are compared one by
# one). A difference here is logged; a difference in any other flag is another experiment, and the
# run stops (check_resume_flags) instead of training or reporting the checkpoint's run under it.
RESUME_MAY_CHANGE = ("data_root", "output_dir", "device", "world_size", "workers", "print_freq", "eval_every",
                     "ratio_every", "diag_every", "diag_batches", "compile", "exit_after_epoch", "preset",
                     "rank", "local_rank", "distributed", "eval", "resume", "amp")
# --amp may change at a resume, said in its own line: a run begun where bf16 is fast (a GPU, a CPU
# with AVX-512 BF16 or AMX) can go on where it is not (check_amp). It changes the arithmetic, not
# the experiment: bf16 and fp32 runs differ less than two seeds do (results/README.md, "--amp").


def as_flag(key, value):
    """A flag and its value as a command line spells it (for messages)."""
    name = "--" + key.replace("_", "-")
    if value is True:
        return name
    if value is False or value is None:
        return f"no {name}"
    return f"{name} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def check_resume_flags(ckpt, args, path):
    """Compare the command's flags with those the checkpoint was trained with: stop with one line
    naming every flag that changes the experiment (and the fix), log those that may change."""
    # flags newer than the checkpoint were not recorded: its run had what the code then did
    saved = {**implied_flags(ckpt["args"]), **ckpt["args"]}
    # G chosen by auto: at a grouping of the checkpoint's run, or at the one saved with it (pending_groups)
    auto = any("num_groups_auto" in (info or {}) for info in
               (ckpt.get("groups_info"), (ckpt.get("pending_groups") or {}).get("groups_info")))

    def same(key):
        mine, theirs = getattr(args, key), saved[key]
        if key == "views" and mine is None:  # not given: the run's own views (taken from the checkpoint)
            return True
        if key == "num_groups" and mine == "auto" and auto:  # auto chose the checkpoint's G, kept for the run
            return True
        return mine == theirs

    keys = [k for k in vars(args) if k in saved]  # a flag with no implied value is not compared
    changed = [k for k in keys if k not in RESUME_MAY_CHANGE and not same(k)]
    if changed:
        raise data_lt.UserError(
            f"{path} is the checkpoint of another run ({', '.join(as_flag(k, saved[k]) for k in changed)}) than this "
            f"command asks for ({', '.join(as_flag(k, getattr(args, k)) for k in changed)}); pass another "
            f"--output-dir to start a new run, or the checkpoint's flags to resume it")
    moved = [k for k in keys if k in RESUME_MAY_CHANGE and k not in ("rank", "local_rank", "distributed", "eval",
                                                                      "resume", "amp") and not same(k)]
    if moved:
        log(args, f"resume: {', '.join(as_flag(k, getattr(args, k)) for k in moved)} (the checkpoint's run had "
                  f"{', '.join(as_flag(k, saved[k]) for k in moved)}); these do not change the experiment")
    if "amp" in keys and not same("amp"):
        log(args, f"resume: {as_flag('amp', args.amp)} (the checkpoint's run had {as_flag('amp', saved['amp'])}): "
                  f"from epoch {ckpt['epoch'] + 1} on the network computes in {'bf16' if args.amp else 'fp32'}")


def implied_flags(saved):
    """What a checkpoint written before a flag existed ran with: the behaviour the flag's default
    keeps (--lr-gamma 0.1 and --class-balanced off; --augment: BCL's release view under --loss bcl,
    else crop and flip)."""
    return {"lr_gamma": 0.1, "class_balanced": False,
            "augment": "release" if saved.get("loss") == "bcl" else "crop-flip"}


def check_output_dir(out):
    """Make --output-dir and write a file there, so that a folder that cannot hold the run's files
    stops it now, not after its first epoch."""
    if out.exists() and not out.is_dir():
        raise data_lt.UserError(f"--output-dir {out} is a file; pass a folder")
    probe = out / f".write-test-{os.getpid()}"
    if not out.exists():  # made here: a run that fails before it writes anything removes it again
        atexit.register(remove_if_empty, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise data_lt.UserError(f"--output-dir {out} cannot be written ({e.strerror or type(e).__name__}: "
                                f"{e.filename}); pass a folder you can write to") from None


def remove_if_empty(folder):
    """At exit: the --output-dir this run made, if it is still empty (the run failed before its first
    file: a missing data set, a bad flag met late, Ctrl-C in the first epoch)."""
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def checkpoint_kept(out):
    """Which checkpoint a stopped run leaves in `out`, and what the same command then does."""
    for path in (Path(out) / "checkpoint.pth", previous_checkpoint(Path(out) / "checkpoint.pth")):
        try:
            epoch = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"]
        except Exception:  # absent, or cut short by the stop
            continue
        return f"the checkpoint of epoch {epoch} in {out} is kept: the same command resumes from epoch {epoch + 1}"
    return f"no checkpoint was written in {out} yet: the same command starts the run again"


def plural(n, word, words=None):
    """'1 epoch', '2 epochs' (words: an irregular plural, e.g. 'classes')."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def pct(v):
    """An accuracy as printed: two decimals, '-' where there is none (no class in that shot group)."""
    return "-" if v is None else f"{v:.2f}"


def hms(seconds):
    """A duration as printed: h:mm:ss."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def write_json(path, obj, mode="w"):
    with open(path, mode) as f:
        f.write(json.dumps(obj) + "\n")


# --- BCL: balanced contrastive learning (Zhu et al. 2022) -----------------------------------------
# The base method of the paper's best numbers (--loss bcl). Its design (the two branches, the
# three views, how its loss meets GBG's step and several processes) is described in
# results/README.md, "BCL as the base method".
#
# la_weight / bcl_weight / bcl_temp (line numbers approximate): ImageNet-LT and iNat 1.0 / 0.35 /
# 0.07, BCL's release (FlamieZhu/Balanced-Contrastive-Learning main.py l.30, l.55-56); CIFAR
# 2.0 / 1.6 / 0.1, the authors' CIFAR release (WickyLee1998/GBG_v1 cifar_Group_full.py l.45,
# l.70-71), behind the paper's CIFAR BCL rows. BCL's own CIFAR weights (2.0 / 0.6 as we read its
# paper) are --la-weight 2 --bcl-weight 0.6.
BCL_PRESETS = {
    "cifar": dict(la_weight=2.0, bcl_weight=1.6, bcl_temp=0.1),
    "imagenet-lt": dict(la_weight=1.0, bcl_weight=0.35, bcl_temp=0.07),
    "inat2018": dict(la_weight=1.0, bcl_weight=0.35, bcl_temp=0.07),
}
BCL_HEADS = ("head.", "head_fc.")  # parameter names of the contrastive branch: no part of MGDA's Gram


def fill_bcl_defaults(args):
    for k, v in BCL_PRESETS.get(args.dataset, BCL_PRESETS["cifar"]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


class CosineClassifier(nn.Module):
    """logits = scale * cos(z, w_k). weight is [K, D] like nn.Linear's: the prototype head reads
    its rows as the K classes."""

    def __init__(self, in_features, out_features, scale=30.0):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_normal_(self.weight)  # only the directions matter

    def forward(self, z):
        return self.scale * F.normalize(z, dim=1) @ F.normalize(self.weight, dim=1).T


def mlp_head(dim_in, hidden, dim_out):
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


def make_bcl_model(model, class_counts):
    """Net -> BCL's two-branch model: cosine classifier, contrastive head `head` and prototype head
    `head_fc` (ResNet-32: 64 -> 512 -> 128; ResNet-50 / ResNeXt-50: 2048 -> 2048 -> 1024, as BCL),
    and the log class prior of the logit adjustment (a buffer outside the state dict).

    The heads' Linear layers as the releases initialise them. CIFAR-sized (D < 2048): Kaiming
    normal weights (fan_in, gain sqrt 2), biases left at nn.Linear's default, as the authors' CIFAR
    model (GBG_v1 models/resnet_cifar.py l.34-37, `init.kaiming_normal_(m.weight)` on every Linear
    and Conv2d, applied by `self.apply(_weights_init)` at l.149 after `head` and `head_center`, our
    `head_fc`, are built at l.144-147). ResNet-50 / ResNeXt-50: nn.Linear's default, as BCL's
    BCLModel (models/resnext.py l.285-302, whose Kaiming loop runs inside the encoder only) and
    GBG_v1's copy of it."""
    D, K = model.fc.in_features, model.fc.out_features
    hidden, out = (D, 1024) if D >= 2048 else (512, 128)
    model.fc = CosineClassifier(D, K)
    model.head, model.head_fc = mlp_head(D, hidden, out), mlp_head(D, hidden, out)
    if D < 2048:
        for layer in (*model.head, *model.head_fc):
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)
    counts = torch.as_tensor(np.asarray(class_counts), dtype=model.fc.weight.dtype).clamp(min=1)  # no log 0
    model.register_buffer("log_prior", torch.log(counts / counts.sum()), persistent=False)
    return model


def bcl_loss(features, targets, prototypes, temperature):
    """Balanced contrastive loss, averaged over the anchors.

    features [N, d]: unit-norm embeddings of all contrastive views (N = views x batch), targets [N];
    prototypes [K, d]: unit-norm class prototypes. Anchor i of class y has the candidates
    A = (features without i) + prototypes, and with s = cosine / temperature
        L_i = -1/|A_y| sum_{p in A_y} log( exp(s_ip) / sum_c 1/|A_c| sum_{k in A_c} exp(s_ik) )
    where A_c holds the candidates of class c. Class-averaging: each class's share of the
    denominator is a mean over its candidates, not a sum. Class-complement: every class has its
    prototype in A, so every A_c is non-empty and every anchor has a positive.
    """
    N, K = len(features), len(prototypes)
    labels = torch.cat([targets, torch.arange(K, device=targets.device)])
    s = features @ torch.cat([features, prototypes]).T / temperature       # [N, N + K]
    same = targets[:, None] == labels[None, :]
    not_self = torch.ones_like(same)
    not_self[:, :N].fill_diagonal_(False)
    # |A_c| of each candidate's class, as seen from each anchor: its own class has one fewer
    size = gbg.count_labels(labels, K)[labels][None, :] - same.long()
    log_den = torch.logsumexp(torch.where(not_self, s - size.to(s.dtype).log(), float("-inf")), dim=1)
    pos = same & not_self
    return -(torch.where(pos, s, 0.0).sum(1) / pos.sum(1) - log_den).mean()


def bcl_contrast(model, z, targets, temperature):
    """BCL loss from the backbone features z [V*B, D] of ALL V views, stacked view by view with the
    classification view first, of the samples with labels targets [B]. The projection head runs
    over all V*B rows, so its BatchNorm1d statistics include the classification view; the loss
    then takes the V - 1 contrastive views' rows. Both releases do so: BCL's BCLModel.forward
    (models/resnext.py l.305-306: `head` over the features of the whole batch) on the three views
    concatenated (main.py l.301-306: torch.cat, model(inputs), then the first third of feat_mlp
    dropped), and GBG_v1's ResNet_s.forward (models/resnet_cifar.py l.171) with
    cifar_Group_full.py l.286-291."""
    B = len(targets)
    emb = F.normalize(model.head(z.to(model.fc.weight.dtype)), dim=1)[B:]  # bf16 autocast -> the heads' dtype
    prototypes = F.normalize(model.head_fc(model.fc.weight), dim=1)
    return bcl_loss(emb, targets.repeat(len(emb) // B), prototypes, temperature)


def bcl_train_views(data, args):
    """make_loader's views: "device" (data_lt.device_views, batched on the device) for data held as
    one tensor unless --views workers, else torchvision pipelines run per sample in workers."""
    where = args.views or ("device" if data.kind == "tensor" else "workers")
    if where == "device":
        if data.kind != "tensor":
            raise data_lt.UserError(f"--views device needs CIFAR-sized images held as one tensor; {args.dataset} "
                                    f"is read from image files: use --views workers")
        return "device"
    size = tuple(data.train.images.shape[-2:]) if data.kind == "tensor" else 224
    return data_lt.bcl_views(data.kind, data.mean, data.std, size)


def uses_views(args):
    """Whether training batches come from make_loader's views: BCL's three, or CE's classification
    view alone under --augment release (else make_loader's own crop and flip)."""
    return args.loss == "bcl" or args.augment == "release"


def train_views(data, args):
    """make_loader's views for training: BCL's three (bcl_train_views); under --loss ce with
    --augment release, BCL's classification view alone, the same draws for the same (seed, index)
    ("device-cls", or the first of the torchvision pipelines); else None."""
    if args.loss == "bcl":
        return bcl_train_views(data, args)
    if args.augment != "release":
        return None
    if data.kind != "tensor":
        raise data_lt.UserError(f"--augment release is the release's CIFAR view (AutoAugment CIFAR10 policy, Cutout "
                                f"16 px); {args.dataset} is read from image files: drop --augment release")
    made = bcl_train_views(data, args)
    return "device-cls" if made == "device" else made[:1]


# --- Learning rate --------------------------------------------------------------------------------
# Linear warm-up, then step (x --lr-gamma, 0.1, at each of --lr-drops, by default 80 % and 90 % of
# the epochs: 160/180 of 200, the CIFAR recipe) or cosine decay. A function of the epoch alone, so
# resume is exact.
def lr_at(epoch, args):
    if epoch < args.warmup_epochs:
        return args.lr * (epoch + 1e-3) / args.warmup_epochs
    if args.schedule == "step":
        drops = args.lr_drops or (0.8 * args.epochs, 0.9 * args.epochs)
        return args.lr * args.lr_gamma ** sum(epoch >= d for d in drops)
    t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.lr * 0.5 * (1 + math.cos(math.pi * t))


def compile_supported():
    """Whether this torch has what --compile uses: torch.compiler.set_stance (torch >= 2.6, for the
    eager grouping and evaluation) and torch._functorch.config.donated_buffer (see compile_backbone)."""
    functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
    return hasattr(torch.compiler, "set_stance") and hasattr(functorch_config, "donated_buffer")


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX). Without it oneDNN emulates
    bf16 and --amp trains several times slower than fp32: on an AVX2 AMD EPYC, a ResNet-8 training
    step on one thread ran at 41 against 298 images/s."""
    cpu = torch.cpu
    if hasattr(cpu, "_is_avx512_bf16_supported"):  # torch >= 2.3
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_amp(args, device):
    """--amp on a CPU without native bf16 stops with one line, before anything is written: a run
    seven times slower than it need be, unannounced, is worse than no run."""
    if args.amp and device.type == "cpu" and not cpu_has_native_bf16():
        raise data_lt.UserError("--amp on this CPU: it has no native bf16 (AVX-512 BF16 or AMX), so bf16 autocast "
                                "would train about 7x slower than fp32 here; leave out --amp (a checkpoint made "
                                "with --amp resumes without it)")


def make_deterministic(args):
    """--deterministic: what CUDA needs to repeat a run bit for bit (the CPU kernels here already do).
    Atomic adds (index_add in the group losses and the sketch, index_put with accumulate in the
    backward of indexing) switch to their sorted deterministic kernels, cuDNN to deterministic
    algorithms without benchmarking, cuBLAS to a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when
    cuBLAS starts, hence before any CUDA work), and fp32 convolutions and matmuls off TF32. An op
    without a deterministic CUDA kernel then raises instead of running."""
    if not args.deterministic:
        return
    if torch.cuda.is_initialized() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        raise data_lt.UserError("--deterministic: CUDA started before train.main; set CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                                "in the environment first")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def compile_backbone(model):
    """--compile: torch.compile the backbone in place (the state dict keeps its keys). The exact
    MGDA step runs G backward passes through one forward (retain_graph), which a compiled
    backward refuses while it donates its buffers to itself, so donation is turned off."""
    torch._functorch.config.donated_buffer = False
    model.backbone.compile()
    return model


def eager(args):
    """Grouping and evaluation run eagerly under --compile: other modes and batch sizes than the
    training steps', each of which would cost a compilation."""
    return torch.compiler.set_stance("force_eager") if args.compile else contextlib.nullcontext()


# --- Stage 1: grouping (Algorithm 1) --------------------------------------------------------------
def check_auto_groups(args, num_present):
    """--num-groups auto: fill --max-groups and check it against the classes that will be grouped
    (those with training images). Default min(8, classes // 2): 8 is twice the paper's best G
    (Fig. 4: more objectives did not help) and the exact MGDA step costs one backward pass per
    group; above classes / 2 most groups would be single classes, the per-class MOO the paper
    found worse (Fig. 4), and every extra candidate G makes the permutation test stricter
    (gbg.choose_num_groups tests each gap against the largest null gap over all candidates)."""
    if num_present < 4:
        raise data_lt.UserError(f"--num-groups auto needs at least 4 classes with training images ({args.dataset} "
                                f"has {num_present}): give --num-groups N")
    if args.max_groups is None:
        args.max_groups = min(8, num_present // 2)
    if args.max_groups > num_present - 1:
        raise data_lt.UserError(f"--max-groups {args.max_groups} must be at most {num_present - 1}: the eigengap at "
                                f"G needs G + 1 of the {num_present} classes of {args.dataset} that have training "
                                f"images")


def choose_groups_auto(A, args, num_present):
    """--num-groups auto on rank 0: gbg.choose_num_groups on the affinity (seeded by --seed),
    logged; returns its dict (groups.json's num_groups_auto)."""
    choice = gbg.choose_num_groups(A, args.max_groups, fallback=min(AUTO_FALLBACK_GROUPS, num_present),
                                   seed=args.seed)
    G, p = choice["num_groups"], choice["p_value"]
    if choice["structured"]:
        log(args, f"num groups: auto chose G={G} of 2..{args.max_groups}, the largest significant eigengap "
                  f"(permutation p = {p:.3f}; the largest gap is at G={choice['eigengap_choice']})")
    else:
        log(args, f"num groups: auto found no group structure in the spectrum (permutation p = {p:.3f}); "
                  f"G={G}, the fallback")
    return choice


def make_groups(model, data, args, device):
    """Class -> group ids (np.int64[K]) by --grouping, identical on every process, and the
    affinity of the grouped classes (gbg only). Only the classes with training images are grouped:
    one without any has no gradient and would leave its group empty in every batch. The others
    join group 0; they never occur in a training batch, so their group changes nothing."""
    present = np.flatnonzero(data.class_counts > 0)
    K, G = data.num_classes, args.num_groups
    A, stats = None, {}
    if args.grouping == "random":
        sub = gbg.random_groups(present.size, G, seed=args.seed)
    elif args.grouping == "count":
        sub = gbg.count_groups(data.class_counts[present], G)
    elif args.grouping == "count_bins":  # G is the number of bins the counts fill
        sub = gbg.count_bins_groups(data.class_counts[present])
    else:
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        P = sum(p.numel() for p in backbone)
        sketch = args.sketch_dim or (None if K * P * 4 <= 2e9 else 16384)
        # Every process takes its share of the classes and the rows are summed on rank 0 (D = P or
        # the sketch size, never both). Rank 0 alone builds the affinity (O(K^2 D)) and solves the
        # NCut, then broadcasts the groups, so no process can disagree.
        mine = present[args.rank::args.world_size]
        t0 = time.time()
        # at ImageNet scale the pass takes minutes: say what runs, and afterwards how long it took
        log(args, f"grouping: class gradients of {present.size} classes over {P:,} backbone parameters"
                  f"{f' (sketch {sketch})' if sketch else ''}, then the affinity and NCut ...")
        grads, info = gbg.class_gradients(model, data.train_eval, K, backbone, classes=mine,
                                          sketch_dim=sketch, max_per_class=args.grad_max_per_class,
                                          device=device, seed=args.seed, recalibrate_bn=args.recalibrate_bn,
                                          return_info=True, worker_init_fn=data_lt.worker_init,
                                          num_workers=0 if data.kind == "tensor" else min(args.workers, 4),
                                          fetch=getattr(data.train_eval, "batch", None))
        grads = grads.to(device)
        confidence = all_reduce_(torch.tensor([info["max_softmax_mean"] * info["samples"], info["samples"]],
                                              dtype=torch.float64, device=device))
        stats = {"max_softmax_mean": (confidence[0] / confidence[1].clamp(min=1)).item(),
                 "recalibrate_bn": args.recalibrate_bn}
        if args.distributed:
            dist.reduce(grads, dst=0)
        log(args, f"grouping: class gradients in {time.time() - t0:.1f}s, mean max-softmax "
                  f"{stats['max_softmax_mean']:.4f}")
        t1 = time.time()
        sub = torch.zeros(present.size, dtype=torch.long, device=device)
        if is_main(args):
            rows = grads[torch.as_tensor(present, device=device)]
            A = gbg.affinity(rows.cpu())
            if G == "auto":  # rank 0 alone; the others learn G from the broadcast groups
                stats["num_groups_auto"] = choose_groups_auto(A, args, present.size)
                G = stats["num_groups_auto"]["num_groups"]
            sub = torch.as_tensor(gbg.ncut_groups(A, G, seed=args.seed, assign=args.ncut_assign), dtype=torch.long,
                                  device=device)
            stats.update(graph=gbg.NCUT_GRAPH, assign=args.ncut_assign if args.ncut_assign == "cluster_qr" else
                         f"kmeans (10 restarts, seed {args.seed})")
            norms = rows.norm(dim=1)  # near 0 for a class the saturated model already predicts
            stats.update(class_grad_norm_min=norms.min().item(), class_grad_norm_max=norms.max().item())
        if args.distributed:
            dist.broadcast(sub, 0)
        sub = sub.cpu().numpy()
        log(args, f"grouping: affinity and NCut of {present.size} classes into {int(sub.max()) + 1} groups in "
                  f"{time.time() - t1:.1f}s")
    groups = np.zeros(K, dtype=np.int64)
    groups[present] = sub
    return groups, A, stats


def describe_groups(groups, A, data, args, epoch, stats=None):
    """groups.json: the groups, their sizes and training counts, the NCut value, and (gbg) how
    saturated the outputs the class gradients saw were (max_softmax_mean) and the range of the
    class-gradient norms."""
    present = data.class_counts > 0
    G = int(groups.max()) + 1
    members = [np.flatnonzero((groups == i) & present).tolist() for i in range(G)]
    return {"epoch": epoch, "grouping": args.grouping, "num_groups": G, "groups": members,
            "sizes": [len(m) for m in members], "counts": [data.class_counts[m].tolist() for m in members],
            "class_names": class_names(data),
            "no_training_images": np.flatnonzero(~present).tolist(),
            "ncut": None if A is None else gbg.ncut_value(A, groups[present]), **(stats or {})}


def class_names(data):
    """A name per class: the data set's (CIFAR's, the class folders'), else the label."""
    return data.class_names or [str(k) for k in range(data.num_classes)]


# Up to this many classes, the printed groups list every class by name; above, a few per group.
NAMED_CLASSES, NAMES_PER_GROUP = 20, 5


def group_lines(info):
    """The printed groups: one line per group, its size, training images and class names."""
    names, lines = info["class_names"], []
    for i, (members, counts) in enumerate(zip(info["groups"], info["counts"])):
        shown = members if len(names) <= NAMED_CLASSES else members[:NAMES_PER_GROUP]
        more = f", ... ({len(members) - len(shown)} more)" if len(shown) < len(members) else ""
        lines.append(f"  group {i}: {plural(len(members), 'class', 'classes')}, {sum(counts)} training images: "
                     f"{', '.join(names[k] for k in shown)}{more}")
    return lines


def add_to_history(info, previous_info, previous_groups, groups, present):
    """groups.json keeps every grouping of the run: `history` lists each one's epoch, groups and
    adjusted Rand index against the grouping before it (over the classes with training images,
    `present`; None for the first), and the choice of --num-groups auto, made at the first
    grouping, stays in it. Returns the new groups.json dict and that index."""
    ari = None if previous_groups is None else gbg.adjusted_rand_index(previous_groups[present], groups[present])
    previous_info = previous_info or {}
    if "num_groups_auto" in previous_info:
        info.setdefault("num_groups_auto", previous_info["num_groups_auto"])
    info["history"] = previous_info.get("history", []) + [
        {"epoch": info["epoch"], "groups": info["groups"], "ari_vs_previous": ari}]
    return info, ari


def make_sampler(data, groups, args, seed=None):
    """GAC batches (--sampler gac) when groups exist; otherwise plain shuffled batches. A single
    group is never missing, so GACBatchSampler with one group is exactly a sharded random batch
    sampler, and every process builds the same global batch and takes its share."""
    labels = gbg._dataset_labels(data.train)  # numpy on the host; the targets may live on the GPU
    use_gac = args.sampler == "gac" and groups is not None
    try:
        return gbg.GACBatchSampler(labels, groups if use_gac else np.zeros(data.num_classes, dtype=np.int64),
                                   args.batch_size // args.world_size, fill=args.gac_fill,
                                   seed=args.seed if seed is None else seed,
                                   num_replicas=args.world_size, rank=args.rank)
    except ValueError as e:
        raise data_lt.UserError(f"--sampler gac: {e} (flags: --num-groups, --gac-fill, --sampler random)") from None


# --- Stage 2: training (Algorithm 2) and evaluation -----------------------------------------------
def batch_losses(model, x, y, counts, args, device):
    """What a step optimises, whatever the step: the logits the group losses take (logit-adjusted
    under BCL, unless --bcl-group-loss ce), the global batch's sample-mean loss (logit-adjusted
    under BCL), the contrastive term (BCL) or None, and the backbone's output z (all views under
    BCL: what --moo-grad features differentiates). Every loss is normalised by the GLOBAL
    batch's class counts, so that the sum over processes of the local losses is the loss of the
    global batch."""
    if isinstance(x, list):  # BCL's [classification view, contrastive view, contrastive view]: one batch
        x = torch.cat(x)     # (see BCL); under --augment release, [classification view] alone
    if args.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        z = model.forward_features(x)
        logits = model.fc(z[:len(y)])
    logits, contrast = logits.to(model.fc.weight.dtype), None  # float32 (float64 models stay float64)
    adjusted = logits
    if args.loss == "bcl":  # the contrastive loss is per process; /world_size, as the gradients are summed
        adjusted = logits + model.log_prior
        contrast = args.bcl_weight * bcl_contrast(model, z, y, args.bcl_temp) / args.world_size
    mean_loss = F.cross_entropy(adjusted, y, reduction="sum") / counts.sum()
    group_logits = logits if args.loss == "bcl" and args.bcl_group_loss == "ce" else adjusted  # see --bcl-group-loss
    return group_logits, mean_loss, contrast, z


def step_losses(model, x, y, class_to_group, G, args, device):
    """One batch as a step sees it: the global class counts, batch_losses' outputs and, with
    groups, the G group losses and which groups are present (else None, None), and z."""
    counts = all_reduce_(gbg.count_labels(y, model.fc.out_features))
    logits, mean_loss, contrast, z = batch_losses(model, x, y, counts, args, device)
    losses = present = None
    if class_to_group is not None:
        losses, present = gbg.group_losses(logits, y, class_to_group, G, mode=args.group_loss,
                                           class_counts=counts, validate=False)
    return counts, logits, mean_loss, contrast, losses, present, z


def last_stage_params(model):
    """The trailing part of the shared network where --moo-grad last takes the Gram: the last
    stage of the CIFAR ResNets (the 64-channel blocks), layer4 of ResNet-50 / ResNeXt-50."""
    body = model.backbone
    if isinstance(body, CifarResNet):
        return [p for b in body.blocks[-(len(body.blocks) // 3):] for p in b.parameters()]
    return list(body.layer4.parameters())


def moo_parameters(model):
    """What the group losses reach, MGDA's parameters: all but the BCL heads (zero blocks there)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(BCL_HEADS)]


def moo_gram_params(model, moo_params, args):
    """Where MGDA's Gram is taken: --moo-grad last, the last stage (plus the classifier unless
    --moo-gram backbone); --moo-grad features, the classifier's beside z (none with --moo-gram
    backbone); --moo-grad exact, every parameter the group losses reach (None) or the
    backbone's alone (--moo-gram backbone, the release: fc, head and head_center left out)."""
    fc = list(model.fc.parameters())
    if args.moo_grad == "last":
        return last_stage_params(model) + (fc if args.moo_gram == "all" else [])
    if args.moo_grad == "features":
        return fc if args.moo_gram == "all" else []
    if args.moo_gram == "backbone":
        return [p for p in moo_params if all(p is not q for q in fc)]
    return None


def available_memory(device):
    """Bytes a new allocation on `device` can take now, or None if unknown. CUDA: the free memory
    the driver reports. CPU: the kernel's MemAvailable (/proc/meminfo: free pages plus reclaimable
    cache; free pages from os.sysconf where there is no /proc), capped by this process's cgroup v2
    memory limit (a SLURM job's allocation) when it has one."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:")), None)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/proc/self/cgroup") as f:
            path = next(l.split(":", 2)[2].strip() for l in f if l.startswith("0::"))
        cgroup = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError, StopIteration):
        pass
    return avail


def check_class_objectives_fit(model, args, num_present, device):
    """--grouping none --moo mgda makes every class in a batch its own objective, and MGDA holds
    their gradients as one [objectives, P] matrix (gbg.group_gradients) on every process. Which
    classes are present is read from the GLOBAL batch (the rows are summed over the processes),
    so the worst case is min(classes with training images, --batch-size) objectives: on
    ImageNet-LT, 256 x 25.6 M float32 = 26 GB per GPU, and as many backward passes a step. Refuse
    up front, in one line, when that matrix alone exceeds the memory available now (the smallest
    over the processes), instead of running out of memory later."""
    moo_params = moo_parameters(model)
    gram = moo_gram_params(model, moo_params, args)
    rows = min(num_present, args.batch_size)
    itemsize = moo_params[0].element_size()
    P = sum(p.numel() for p in (gram if args.moo_grad in ("last", "features") else moo_params))
    need = rows * P * itemsize
    if args.moo_grad == "features":  # the classifier's rows are float64 there (gbg.mgda_backward_features),
        need += rows * P * (8 - itemsize)  # beside the rows of z: batch x views x D
        z = args.batch_size // args.world_size * (3 if args.loss == "bcl" else 1) * model.fc.in_features
        P, need = P + z, need + rows * z * itemsize
    avail = available_memory(device)
    if args.distributed:  # every process decides alike
        t = torch.tensor([float("inf") if avail is None else avail], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        avail = None if math.isinf(t.item()) else int(t.item())
    if avail is None or need <= avail:
        return need, avail
    fits = int(avail // (P * itemsize)) // args.world_size * args.world_size
    last = sum(p.numel() for p in last_stage_params(model) + (list(model.fc.parameters())
                                                              if args.moo_gram == "all" else []))
    smaller = f", or --batch-size {fits} or less" if fits >= args.world_size else ""
    raise data_lt.UserError(
        f"--grouping none --moo mgda: up to {rows} objectives a step (min of the {num_present} classes with training "
        f"images and --batch-size {args.batch_size}) need a [{rows}, {P:,}] {moo_params[0].dtype} gradient matrix of "
        f"{need / 2**30:.1f} GiB on every process, more than the {avail / 2**30:.1f} GiB available on {device}; "
        f"use {'--moo-grad last (the matrix over the last stage: ' + format(rows * last * itemsize / 2**30, '.1f') + ' GiB), ' if args.moo_grad != 'last' else ''}"
        f"{'--moo-grad features (the rows of z and the classifier), ' if args.moo_grad != 'features' else ''}"
        f"--grouping gbg (--num-groups objectives){smaller}")


def take_step(losses, present, mean_loss, contrast, model, args, state, step, measure=False, features=None):
    """How the step is taken: p.grad <- the update for this batch's losses, summed over the
    processes (gbg does every sum, given the process group). Plain CE; the paper's "average"
    ablation (equal weights on the groups present); or MGDA (Alg. 2), solving for the weights
    every --moo-every steps and whenever the groups present change (`state` keeps the last
    weights and the gradient workspace). Under BCL the group direction is scaled by la_weight and
    the contrastive gradient added (as the release: BCL is not one of MGDA's objectives). Returns
    MGDA's result dict when it solved ({} otherwise), with "d_norm" = |d| over moo_params when
    `measure`. features: the backbone's output z, for --moo-grad features.

    Nothing here reads the device but the MGDA solve (the Gram and the losses, one copy) and, when
    batches are not GAC-completed, which groups are present (GAC puts every group in every batch)."""
    pg = dist.group.WORLD if args.distributed else None
    params = [p for p in model.parameters() if p.requires_grad]
    moo_params = moo_parameters(model)
    bcl = contrast is not None
    la = args.la_weight if bcl else 1.0
    extra = [contrast] if bcl else []
    if losses is None:
        gbg.weighted_backward([mean_loss] + extra, [la] + [1.0] * bcl, params, process_group=pg)
        return {}
    if args.moo == "none":
        average_step(losses, present, la, extra, params, pg)
        return {}
    idx = list(range(len(losses))) if args.sampler == "gac" else present.nonzero().flatten().tolist()
    out = mgda_step([losses[i] for i in idx], idx, model, moo_params, args, state, step, bcl, pg, features)
    if measure:
        out["d_norm"] = torch.cat([p.grad.reshape(-1) for p in moo_params if p.grad is not None]).norm()
    if bcl:  # p.grad = la_weight * d + the BCL gradient (see BCL)
        for p in moo_params:
            if p.grad is not None:
                p.grad.mul_(la)
        gbg.weighted_backward([contrast], [1.0], params, process_group=pg)
    return out


def average_step(losses, present, la, extra, params, pg):
    """--moo none, the paper's "GBG" ablation: equal weights on the groups present (la_weight
    shared among them under BCL, the contrastive loss added), computed on the device."""
    weights = present.to(losses.dtype) * (la / present.sum().to(losses.dtype))
    if extra:
        weights = torch.cat([weights, weights.new_ones(1)])
    gbg.weighted_backward(list(losses) + extra, weights, params, process_group=pg)


def mgda_step(group_terms, idx, model, moo_params, args, state, step, bcl, pg, features=None):
    """Alg. 2: p.grad <- d = sum_i alpha_i g_i over the groups `idx` of the batch, alpha from MGDA
    every --moo-every steps and whenever those groups change, else the last solve's (`state`).
    bcl: keep the graph for the contrastive backward after it."""
    out = {}
    if step % args.moo_every == 0 or state.get("groups") != idx:
        kw = dict(normalize=args.normalize, update=args.moo_update, retain_graph=bcl, process_group=pg)
        gram_params = moo_gram_params(model, moo_params, args)
        if args.moo_grad == "last":
            out = gbg.mgda_backward_partial(group_terms, moo_params, gram_params, **kw)
        elif args.moo_grad == "features":
            out = gbg.mgda_backward_features(group_terms, features, moo_params, gram_params=gram_params, **kw)
        else:
            out = gbg.mgda_backward(group_terms, moo_params, gram_params=gram_params,
                                    workspace=state.setdefault("workspace", {}), **kw)
        state.update(groups=idx, weights=out["weights"])
    else:  # --moo-every: the last solve's weights, one backward
        gbg.weighted_backward(group_terms, state["weights"], moo_params, retain_graph=bcl, process_group=pg)
    out["groups"] = idx
    return out


def print_every(args, steps):
    """Steps between progress lines: --print-freq, or (0, the default) about ten lines an epoch."""
    return args.print_freq or max(1, math.ceil(steps / 10))


def train_one_epoch(model, loader, optimizer, epoch, args, class_to_group, device, clock=None):
    """One epoch of Algorithm 2: per batch, the group losses, then the step along d = sum_i
    alpha_i g_i (take_step). EpochStats keeps the statistics on the device; they are read every
    print_every steps (the progress line and the finiteness check) and at the end: no host read
    per step but MGDA's. clock (RunClock): the run's time left, on the progress lines."""
    model.train()
    G = 0 if class_to_group is None else int(class_to_group.max()) + 1
    meter, state = EpochStats(model, G, args, device), {}  # state: MGDA's last weights and workspace
    every = print_every(args, len(loader))
    for step, (x, y) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch + step / len(loader), args)
        counts, logits, mean_loss, contrast, losses, present, z = step_losses(model, x, y, class_to_group, G, args,
                                                                              device)
        optimizer.zero_grad(set_to_none=True)
        measure = meter.measures(losses, step)
        if measure:  # update_ratio's reference, before the step frees the graph
            meter.plain_gradient_norm(mean_loss)
        solved = take_step(losses, present, mean_loss, contrast, model, args, state, step, measure, z)
        meter.add(solved, y, logits, mean_loss, contrast, losses, present)
        optimizer.step()
        if step % every == 0 or step == len(loader) - 1:
            meter.progress(epoch, step, len(loader), optimizer, clock)
    return meter.result(len(loader), optimizer)


class EpochStats:
    """What an epoch reports beside its step, accumulated on the device (each process its share,
    summed when read): the losses, MGDA's weights and their Pareto cosines, |d| against the plain
    gradient (update_ratio), the per-class and per-group training losses."""

    def __init__(self, model, G, args, device):
        self.model, self.G, self.args, self.t0 = model, G, args, time.time()
        self.pg = dist.group.WORLD if args.distributed else None
        self.moo_params = moo_parameters(model)
        K = model.fc.out_features
        # this process's share of: the loss, the contrastive loss, the samples; summed over processes
        # when read (every loss is normalised by the global batch, so the shares add up to it)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.alpha_sum = torch.zeros(max(G, 1), dtype=torch.float64)
        self.alpha_n = torch.zeros(max(G, 1), dtype=torch.float64)
        self.cos_min, self.ratios, self.g_mean = torch.ones((), dtype=torch.float64), [], None
        # per class: the summed training loss (plain CE of the logits the groups see) and the samples;
        # per group: the summed group loss and the steps it was present in
        self.class_loss = torch.zeros(2, K, dtype=torch.float64, device=device)
        self.group_loss = torch.zeros(2, max(G, 1), dtype=torch.float64, device=device)

    def measures(self, losses, step):
        """update_ratio: |d| against the gradient of the plain sample-mean loss, taken (one extra
        backward) on every --ratio-every-th MGDA step."""
        args = self.args
        return losses is not None and args.moo == "mgda" and args.ratio_every > 0 and step % args.ratio_every == 0

    def plain_gradient_norm(self, mean_loss):
        """|gradient of the sample-mean loss|, keeping the graph for the step."""
        self.g_mean = gbg.group_gradients([mean_loss], self.moo_params, retain_graph=True, process_group=self.pg).norm()

    def add(self, solved, y, logits, mean_loss, contrast, losses, present):
        if "d_norm" in solved:
            self.ratios.append(solved["d_norm"] / self.g_mean)
        if "alpha" in solved:  # on the host already: the solver's output
            idx = solved["groups"]
            self.alpha_sum[idx] += solved["alpha"]
            self.alpha_n[idx] += 1
            self.cos_min = torch.minimum(self.cos_min, gbg.pareto_cosines(solved["gram"], solved["alpha"])[0].min())
        total = mean_loss.detach() if contrast is None else self.args.la_weight * mean_loss.detach() + contrast.detach()
        bcl_part = contrast.detach() if contrast is not None else torch.zeros_like(total)
        self.sums += torch.stack([total, bcl_part, torch.full_like(total, len(y))]).double()
        with torch.no_grad():
            ce = F.cross_entropy(logits.detach(), y, reduction="none").double()
            self.class_loss[0].index_add_(0, y, ce)
            self.class_loss[1].index_add_(0, y, torch.ones_like(ce))
            if losses is not None:
                self.group_loss += torch.stack([losses.detach().double() * present, present.double()])

    def progress(self, epoch, step, steps, optimizer, clock):
        """The finiteness check and (rank 0) the progress line, with the epoch's and the run's ETA."""
        args = self.args
        seen = all_reduce_(self.sums.clone()).tolist()  # the global sums, on every process
        if not math.isfinite(seen[0]):
            # every epoch before this one ended with a checkpoint (this run's, or the one it resumed)
            kept = (f"the checkpoint of epoch {epoch - 1} in {args.output_dir} is kept" if epoch > 0 else
                    "no checkpoint was written (the first epoch diverged)")
            raise data_lt.UserError(f"loss is {seen[0]} at epoch {epoch} by step {step}: the run diverged; start "
                                    f"it again with a lower --lr (now {args.lr}) or --wd (now {args.wd})"
                                    f"{' or without --amp' if args.amp else ''} in another --output-dir; {kept}")
        if is_main(args):
            elapsed = time.time() - self.t0
            left = (steps - step - 1) * elapsed / (step + 1)
            run_left = f", run eta {clock.eta_text(epoch, left, left + elapsed)}" if clock else ""
            print(f"epoch {epoch} [{step + 1}/{steps}] loss {seen[0] / (step + 1):.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.4g} {seen[2] / max(elapsed, 1e-9):.0f} img/s "
                  f"eta {hms(left)} (epoch){run_left}", flush=True)

    def result(self, steps, optimizer):
        """log.txt's training statistics of the epoch (one host read of each sum)."""
        args, G = self.args, self.G
        seen = all_reduce_(self.sums.clone()).tolist()
        n_seen = int(seen[2])
        stats = {"train_loss": seen[0] / steps, "lr": optimizer.param_groups[0]["lr"],
                 "train_samples": n_seen, "images_per_s": n_seen / max(time.time() - self.t0, 1e-9),
                 "train_time_s": time.time() - self.t0}
        if self.alpha_n.sum() > 0:
            stats["alpha_mean"] = (self.alpha_sum / self.alpha_n.clamp(min=1)).tolist()
            stats["cos_d_g_min"] = self.cos_min.item()
        if self.ratios:  # mean over the measured steps of |d| / |g_mean|
            stats["update_ratio"] = torch.stack(self.ratios).mean().item()
        class_loss = all_reduce_(self.class_loss).cpu()  # each process's samples: summed
        stats["train_class_loss"] = [None if n == 0 else l / n for l, n in class_loss.T.tolist()]
        if G:  # each process holds its share of the global group losses, and the same `present`
            group_loss = all_reduce_(self.group_loss).cpu()
            stats["train_group_loss"] = [None if n == 0 else l * args.world_size / n for l, n in group_loss.T.tolist()]
        if args.loss == "bcl":  # the unweighted contrastive loss, averaged over steps and processes
            stats["train_bcl_loss"] = seen[1] / (steps * args.bcl_weight)
        return stats


DIAG_SEED = 20240220  # the fixed batches of --diag-every: the same in every run and every epoch


def diag_loader(data, groups, args, device):
    """--diag-every's fixed batches: the first --diag-batches batches of the run's own sampler (GAC
    with the groups, else shuffled) drawn with DIAG_SEED, without augmentation (data.train_eval)."""
    sampler = make_sampler(data, groups, args, seed=DIAG_SEED)
    sampler.set_epoch(0)
    batches = [b for b, _ in zip(sampler, range(args.diag_batches))]
    return data_lt.make_loader(data.train_eval, batches, train=False, device=device, num_workers=0)


def gradient_diagnostic(model, loader, class_to_group, class_counts, args, device):
    """The paper's Fig. 2 measure (gbg.class_update_cosines) on the fixed batches: per class, the
    mean over the batches that hold it of cos(g_k, d) and |g_k| / |d|, d = the update the training
    step would take on that batch (before momentum and weight decay), and their means over the
    Many / Medium / Few classes. Leaves the model as it was: the BatchNorm buffers are restored and
    p.grad cleared (the next step sets it anew); draws nothing from the training's random state."""
    model.train()  # the step's own mode: batch statistics
    saved = {k: v.clone() for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
    K = model.fc.out_features
    G = 0 if class_to_group is None else int(class_to_group.max()) + 1
    params = moo_parameters(model)
    pg = dist.group.WORLD if args.distributed else None
    cos_sum, ratio_sum, seen = (torch.zeros(K, dtype=torch.float64) for _ in range(3))
    for x, y in loader:
        counts, logits, mean_loss, contrast, losses, present, z = step_losses(model, x, y, class_to_group, G, args,
                                                                              device)
        model.zero_grad(set_to_none=True)
        take_step(losses, present, mean_loss, contrast, model, args, {}, 0, features=z)  # p.grad <- d
        d = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
        model.zero_grad(set_to_none=True)
        logits = batch_losses(model, x, y, counts, args, device)[0]  # the same forward again, a fresh graph
        cos, ratio = gbg.class_update_cosines(logits, y, d, params, class_counts=counts, process_group=pg)
        ok = ~cos.isnan()
        cos_sum[ok] += cos[ok]
        ratio_sum[ok] += ratio[ok]
        seen += ok.double()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved, strict=False)
    cos = torch.where(seen > 0, cos_sum / seen.clamp(min=1), float("nan"))
    ratio = torch.where(seen > 0, ratio_sum / seen.clamp(min=1), float("nan"))
    nan_to_none = lambda t: [None if math.isnan(v) else v for v in t.tolist()]
    out = {"diag_cos": nan_to_none(cos), "diag_ratio": nan_to_none(ratio)}
    for name, mask in data_lt.shot_masks(class_counts).items():
        m = torch.as_tensor(mask) & (seen > 0)
        out[f"diag_cos_{name}"] = cos[m].mean().item() if m.any() else None
    return out


@torch.no_grad()
def evaluate(model, loader, class_counts, device, args):
    """Top-1 over the whole split and over the Many / Medium / Few classes (by training count)."""
    model.eval()
    K = len(class_counts)
    correct = torch.zeros(K, dtype=torch.float64, device=device)
    total = torch.zeros(K, dtype=torch.float64, device=device)
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            pred = model(x.contiguous(memory_format=torch.channels_last) if args.amp else x).argmax(1)
        # fixed-size counts: bincount and y[pred == y] would size their outputs on the host
        total.index_add_(0, y, torch.ones_like(y, dtype=total.dtype))
        correct.index_add_(0, y, (pred == y).to(correct.dtype))
    correct, total = all_reduce_(correct).cpu(), all_reduce_(total).cpu()
    out = {"top1": 100.0 * correct.sum().item() / max(total.sum().item(), 1)}
    for name, mask in data_lt.shot_masks(class_counts).items():
        m = torch.as_tensor(mask)
        out[name] = 100.0 * correct[m].sum().item() / total[m].sum().item() if total[m].sum() > 0 else None
    return out


def eval_loader(ds, args, device):
    """Each process evaluates its own share of the split; the per-class counts are summed."""
    idx = np.arange(len(ds))[args.rank::args.world_size]
    bs = max(args.batch_size // args.world_size, 1)
    return data_lt.make_loader(ds, [idx[i:i + bs].tolist() for i in range(0, len(idx), bs)],
                               train=False, device=device, num_workers=args.workers)


# --- Main: evaluation of a checkpoint, reporting, the run -----------------------------------------
# What each accuracy in results.json is, so that a reader compares like with like.
PROTOCOLS = {
    "last": "test top-1 after the final epoch",
    "best_on_val": "test top-1 of the epoch with the best val top-1 (data sets with a val split: ImageNet-LT)",
    "best_test": "the best test top-1 over the evaluated epochs (the protocol of LDAM-DRW and of the authors' "
                 "release; it selects on the test set)",
}


def log_lines(log_path):
    """log.txt's complete lines ([] without the file). A last line without its newline is left
    out: the run was killed (or its node failed) while writing it, before that epoch's checkpoint,
    so the epoch runs again and logs it whole. Any other line that is not an epoch's JSON (an edit,
    a disk fault) stops the run with its number before anything is written: the checkpoint stays."""
    if not Path(log_path).exists():
        return []
    with open(log_path) as f:
        lines = [line for line in f if line.endswith("\n")]
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and isinstance(entry.get("epoch"), int)
        except ValueError:
            ok = False
        if not ok:
            raise data_lt.UserError(f"{log_path} line {number} is not an epoch's JSON line ({line.strip()[:60]!r}); "
                                    f"mend or delete that line and run again (the checkpoint is untouched)")
    return lines


def best_test_in(log_path, before_epoch):
    """The best test epoch among the log lines of epochs < before_epoch (a resumed run's past)."""
    best = None
    for e in map(json.loads, log_lines(log_path)):
        if e["epoch"] >= before_epoch or e.get("test_top1") is None:
            continue
        if best is None or e["test_top1"] > best["top1"]:
            best = {"epoch": e["epoch"], **{k[5:]: v for k, v in e.items() if k.startswith("test_")}}
    return best


# The options that define the model and its data; --eval takes them from the checkpoint.
MODEL_OPTIONS = ("dataset", "imb_factor", "data_seed", "arch", "loss")


def load_for_eval(args):
    if args.resume is None:  # before fill_defaults, whose check says the same
        raise data_lt.UserError(EVAL_NEEDS_RESUME)
    path = Path(args.resume)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        trained = ckpt["args"]
        ckpt["model"]
    except FileNotFoundError:
        raise data_lt.UserError(f"--resume {path}: no such file; pass the checkpoint.pth of a run") from None
    except Exception as e:
        raise data_lt.UserError(f"--resume {path} is not a train.py checkpoint ({type(e).__name__}); pass the "
                                f"checkpoint.pth of a run") from None
    if args.data_root is None:  # where the checkpoint's run read its data, unless given
        args.data_root = trained.get("data_root")
    for k in MODEL_OPTIONS:
        # checkpoints from before --data-seed cut the subset with --seed
        value = trained.get(k, trained.get("seed") if k == "data_seed" else None)
        if value is not None:
            setattr(args, k, value)
    return ckpt


def evaluate_checkpoint(model, ckpt, data, args, device):
    """--eval --resume PATH: top-1 and Many / Medium / Few of the checkpoint on test (and val)."""
    model.load_state_dict({k: v.to(device) for k, v in ckpt["model"].items()})
    results = {"checkpoint": str(args.resume), "epoch": ckpt.get("epoch")}
    splits = [("test", data.test)] + ([("val", data.val)] if data.val is not None else [])
    for name, ds in splits:
        results[name] = evaluate(model, eval_loader(ds, args, device), data.class_counts, device, args)
        m = results[name]
        log(args, f"{name}: top-1 {pct(m['top1'])}, many {pct(m['many'])}, medium {pct(m['medium'])}, "
                  f"few {pct(m['few'])} ({args.resume}, epoch {ckpt.get('epoch')})")
    return results


def group_classes(model, data, args, device, epoch, groups, groups_info):
    """Stage 1 at `epoch`: the groups (make_groups), groups.json with the history of the run's
    groupings, and the log's summary. Returns the groups, groups.json's dict and the adjusted
    Rand index against the previous groups (None at the first grouping)."""
    previous, present = groups, np.flatnonzero(data.class_counts > 0)
    with eager(args):
        groups, A, grouping_stats = make_groups(model, data, args, device)
    if args.num_groups == "auto":  # chosen now, at the first grouping; regroupings keep it
        args.num_groups = int(groups.max()) + 1
        if "num_groups_auto" in grouping_stats:
            grouping_stats["num_groups_auto"]["epoch"] = epoch
    info = describe_groups(groups, A, data, args, epoch, grouping_stats)
    groups_info, regroup_ari = add_to_history(info, groups_info, previous, groups, present)
    ncut = "" if info["ncut"] is None else f", NCut value {info['ncut']:.4f}"
    moved = "" if regroup_ari is None else f", adjusted Rand index {regroup_ari:.3f} vs the previous groups"
    log(args, f"groups (epoch {epoch}): sizes {info['sizes']}{ncut}{moved}")
    for line in group_lines(info):
        log(args, line)
    if is_main(args):
        write_json(Path(args.output_dir) / "groups.json", groups_info)
    return groups, groups_info, regroup_ari


def evaluate_splits(model, test_loader, val_loader, class_counts, device, args):
    """log.txt's test_* (and val_*) accuracies of the model now."""
    with eager(args):
        out = {f"test_{k}": v for k, v in evaluate(model, test_loader, class_counts, device, args).items()}
        if val_loader is not None:
            out.update({f"val_{k}": v for k, v in evaluate(model, val_loader, class_counts, device, args).items()})
    return out


class RunClock:
    """The run's time: the seconds it has trained, across resumes (log.txt's time_s; each checkpoint
    keeps it as elapsed_s, so a resumed run continues the count), and the time it has left.

    Epochs differ in cost by kind: kind(epoch) is "GBG" for the epochs that step on groups (G
    backward passes a step) and "plain" for the others (the warm-up before the grouping); each kind
    is timed on its own, and each grouping (at the epochs in `groupings`) apart from its epoch. The
    time left is unknown (eta returns None) while an epoch kind or a grouping still to come has not
    been timed: at the end of the warm-up the run's ETA waits for the first GBG epoch, instead of
    pricing it as a warm-up epoch. now: the clock (tests pass a fake one)."""

    def __init__(self, epochs, before=0.0, kind=lambda epoch: "plain", groupings=(), now=time.time):
        self.epochs, self.before, self.kind, self.groupings, self.now = epochs, before, kind, set(groupings), now
        self.t0 = self.epoch_t0 = now()
        self.epoch, self.grouping_t = 0, 0.0
        self.epoch_s, self.grouping_s = {}, []  # whole epochs by kind (their grouping left out), groupings

    def elapsed(self):
        return self.before + self.now() - self.t0

    def start_epoch(self, epoch):
        self.epoch, self.epoch_t0, self.grouping_t = epoch, self.now(), 0.0

    def grouped(self, seconds):
        """The grouping of the current epoch took `seconds`."""
        self.grouping_s.append(seconds)
        self.grouping_t += seconds

    def end_epoch(self):
        self.epoch_s.setdefault(self.kind(self.epoch), []).append(self.now() - self.epoch_t0 - self.grouping_t)

    def eta(self, epoch, left_in_epoch, epoch_estimate=None):
        """Seconds left: what is left of epoch `epoch`, then each later epoch at the mean of the last
        five whole epochs of its kind (evaluation and checkpoint included), or for epoch's own kind
        before one ends at epoch_estimate, plus each grouping to come at the mean of the last ones.
        None while a kind or a grouping to come has not been timed."""
        left = left_in_epoch
        for e in range(epoch + 1, self.epochs):
            recent = self.epoch_s.get(self.kind(e), [])[-5:]
            if recent:
                left += sum(recent) / len(recent)
            elif epoch_estimate is not None and self.kind(e) == self.kind(epoch):
                left += epoch_estimate
            else:
                return None
            if e in self.groupings:
                if not self.grouping_s:
                    return None
                left += sum(self.grouping_s[-5:]) / len(self.grouping_s[-5:])
        return left

    def eta_text(self, epoch, left_in_epoch, epoch_estimate=None):
        """eta as printed: h:mm:ss, or when it cannot be known yet, after what it will be."""
        left = self.eta(epoch, left_in_epoch, epoch_estimate)
        if left is not None:
            return hms(left)
        kinds = [self.kind(e) for e in range(epoch + 1, self.epochs) if not self.epoch_s.get(self.kind(e))]
        return f"after the first {kinds[0]} epoch" if kinds else "after the first grouping"


def run_clock(args, before):
    """The run's RunClock: its GBG epochs (from --group-epoch on, with --grouping other than none)
    and the epochs at which it groups (--group-epoch, then every --regroup-every)."""
    if args.grouping == "none":
        return RunClock(args.epochs, before)
    every = args.regroup_every or args.epochs
    return RunClock(args.epochs, before, kind=lambda e: "GBG" if e >= args.group_epoch else "plain",
                    groupings=range(args.group_epoch, args.epochs, every))


def elapsed_before(ckpt, log_path, start_epoch):
    """The seconds a resumed run had trained: its checkpoint's elapsed_s, or for a checkpoint from
    before elapsed_s, the time_s of its last epoch in log.txt (0 when neither says)."""
    if ckpt is None:
        return 0.0
    if "elapsed_s" in ckpt:
        return ckpt["elapsed_s"]
    logged = map(json.loads, log_lines(log_path))
    return max([0.0] + [e["time_s"] for e in logged if e["epoch"] < start_epoch and "time_s" in e])


def epoch_line(epoch, stats, clock, args):
    """The line closing an epoch: its test accuracy when it was evaluated, the run's time and ETA."""
    if "test_top1" in stats:
        done = (f"test top-1 {pct(stats['test_top1'])} (many {pct(stats.get('test_many'))}, "
                f"medium {pct(stats.get('test_medium'))}, few {pct(stats.get('test_few'))})")
    else:
        loss = f"train loss {stats['train_loss']:.4f}, " if "train_loss" in stats else ""
        done = f"{loss}not evaluated (--eval-every {args.eval_every})"
    left = f", eta {clock.eta_text(epoch, 0.0)}" if epoch + 1 < args.epochs else ""
    return f"epoch {epoch}: {done}; {hms(clock.elapsed())} elapsed{left}"


def warm_up_text(args):
    """The run line's warm-up: its epochs, or the part of it that runs when the run is shorter."""
    if args.warmup_epochs > args.epochs:
        return f"{args.epochs:g} of its {args.warmup_epochs:g} epochs"
    return f"{args.warmup_epochs}"


def short_run_note(args):
    """One line when the run ends inside its warm-up (e.g. --epochs 1 on CIFAR's 5-epoch warm-up):
    the lr never reaches --lr, and the default grouping is at the initial model; None otherwise."""
    if args.warmup_epochs <= 0 or math.ceil(args.warmup_epochs) < args.epochs:
        return None
    what = []
    if args.warmup_epochs > args.epochs:
        what.append(f"the lr rises to at most {lr_at(args.epochs, args):.3g}, never to --lr {args.lr:g},")
    if args.grouping != "none" and args.group_epoch == 0:
        what.append("the classes are grouped at the initial model (epoch 0), not at the end of the warm-up")
    if not what:
        return None
    return (f"run: {plural(args.epochs, 'epoch')}, not longer than the {args.warmup_epochs:g}-epoch warm-up: "
            f"{' and '.join(what)}; for a whole run give more --epochs, or --warmup-epochs 0 for a quick check")


# A GBG update shorter than this fraction of the plain gradient's (log.txt's update_ratio) for this
# many epochs in a row is reported: the default rule's steps are 0.3-0.6 of it (results/README.md,
# "CPU miniature", by lr phase), and a collapsed run (1e-8 .. 1e-11 for 130 epochs) sat at chance.
NEGLIGIBLE_UPDATE, NEGLIGIBLE_EPOCHS = 1e-3, 3


def main(args):
    # --- setup ------------------------------------------------------------------------------------
    make_deterministic(args)  # before any CUDA work (cuBLAS reads its workspace setting once)
    init_distributed(args)
    ckpt = load_for_eval(args) if args.eval else None  # takes the model's options from the checkpoint
    fill_defaults(args)
    if args.loss == "bcl":
        fill_bcl_defaults(args)
    device = torch.device(args.device)
    check_amp(args, device)
    if device.type == "cpu":
        keep_freed_memory()  # see there: the exact MGDA step at its floor on the CPU
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output_dir)
    if is_main(args) and not args.eval:
        check_output_dir(out)
    if args.eval:
        log(args, f"eval: {args.resume} ({args.dataset} IF {args.imb_factor:g}, data seed {args.data_seed}, "
                  f"{args.arch}, loss {args.loss}); data root {args.data_root}; device {device}")
    else:
        log(args, f"run: {args.dataset} IF {args.imb_factor:g}, {args.arch}, {plural(args.epochs, 'epoch')}, batch "
                  f"{args.batch_size} over {plural(args.world_size, 'process', 'processes')}, lr {args.lr} "
                  f"{args.schedule}{f' x{args.lr_gamma:g} a drop' if args.schedule == 'step' else ''} (warm-up "
                  f"{warm_up_text(args)}), wd {args.wd}; loss {args.loss}"
                  f"{' class-balanced' if args.class_balanced else ''}, augment {args.augment}, "
                  f"grouping {args.grouping} (G={args.num_groups}), moo {args.moo} "
                  f"({args.moo_grad}, normalize {args.normalize}), sampler {args.sampler}, workers {args.workers}; "
                  f"device {device}, {'bf16 autocast' if args.amp else 'fp32'}"
                  f"{f'; preset {args.preset}' if args.preset else ''}")
        short = short_run_note(args)
        if short:
            log(args, short)

    # --- data -------------------------------------------------------------------------------------
    data = data_lt.build_data(args.dataset, args.data_root, imb_factor=args.imb_factor, seed=args.data_seed)
    K, present = data.num_classes, np.flatnonzero(data.class_counts > 0)
    if args.grouping != "none" and not args.eval and args.num_groups == "auto":
        check_auto_groups(args, present.size)
    elif args.num_groups != "bins" and args.grouping != "none" and not args.eval \
            and not 1 <= args.num_groups <= present.size:
        raise data_lt.UserError(f"--num-groups {args.num_groups} must be between 1 and the {present.size} classes of "
                                f"{args.dataset} that have training images")
    if data.kind == "tensor":  # CIFAR-sized: the whole set lives on the device, augmented there
        same = data.train_eval is data.train
        data.train, data.test = data.train.to(device), data.test.to(device)
        data.train_eval = data.train if same else data.train_eval.to(device)
        if data.val is not None:
            data.val = data.val.to(device)
    empty = K - present.size
    log(args, f"data: {len(data.train)} training images in {K} classes (largest {data.class_counts.max()}, "
              f"smallest {data.class_counts[present].min()}), {len(data.test)} test images"
              + (f"; {plural(empty, 'class', 'classes')} {'has' if empty == 1 else 'have'} no training image"
                 if empty else ""))

    # --- model ------------------------------------------------------------------------------------
    model = build_model(args.arch, K)
    if args.loss == "bcl":
        model = make_bcl_model(model, data.class_counts)
        log(args, f"bcl: {args.la_weight} * logit-adjusted CE + {args.bcl_weight} * BCL (temperature {args.bcl_temp})")
    if args.sync_bn and args.distributed:
        model = convert_sync_bn(model, device)
    model.to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_backbone(model)
    if args.distributed:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    if args.eval:
        return evaluate_checkpoint(model, ckpt, data, args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

    # --- resume -----------------------------------------------------------------------------------
    start_epoch, groups, groups_info, best, ckpt_path = 0, None, None, None, out / "checkpoint.pth"
    ckpt, resume_path = load_resume_checkpoint(ckpt_path, args)
    if ckpt is not None:
        check_resume_flags(ckpt, args, resume_path)  # never another experiment's weights under these flags
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, groups, best = ckpt["epoch"] + 1, ckpt["groups"], ckpt["best"]
        groups_info = ckpt.get("groups_info")  # groups.json as of this checkpoint, history included
        if args.num_groups == "auto" and groups_info and "num_groups_auto" in groups_info:
            args.num_groups = groups_info["num_groups"]  # chosen at the first grouping, kept for the run
        set_rng_state(ckpt["rng"])
        log(args, f"resumed from {resume_path} at epoch {start_epoch}")
        if uses_views(args) and args.views is None:  # the run's own views; runs from before --views: workers
            args.views = ckpt["args"].get("views") or "workers"
        if is_main(args) and (out / "log.txt").exists():  # drop lines of epochs that will run again
            lines = [l for l in log_lines(out / "log.txt") if json.loads(l)["epoch"] < start_epoch]
            # not in place: a kill or a node failure while log.txt is rewritten would leave it empty
            replace_durably(out / "log.txt", lambda f: f.write("".join(lines).encode()))
    elif is_main(args):  # a fresh start: no file of an earlier run (killed before its first checkpoint,
        # or finished and its checkpoints moved away) may stand beside this run's new log
        stale = [name for name in ("log.txt", "log.txt.tmp", "groups.json", "results.json") if (out / name).exists()]
        for name in stale:
            (out / name).unlink()
        if stale:
            log(args, f"run: no checkpoint in {out}; removed the earlier run's {', '.join(stale)}")
    if args.grouping == "none" and (args.moo == "mgda" or args.class_balanced):
        # every class with training images its own objective (the paper's "MOO" ablation), or its own
        # group averaged with the others present (--class-balanced: the mean of the classes' mean losses)
        if args.moo == "mgda":
            check_class_objectives_fit(model, args, present.size, device)
        groups = np.zeros(K, dtype=np.int64)
        groups[present] = np.arange(present.size)
    if ckpt is not None and "best_test" in ckpt:  # the log may be cut short, or not moved with the checkpoint
        best_test = ckpt["best_test"]
    else:  # checkpoints from before best_test was saved: the epochs in the log
        best_test = best_test_in(out / "log.txt", start_epoch) if is_main(args) else None
    if uses_views(args):  # saved with the checkpoints, so that a resumed run keeps its views
        args.views = "device" if train_views(data, args) in ("device", "device-cls") else "workers"
        log(args, f"{'bcl' if args.loss == 'bcl' else 'augment release'}: views made "
                  f"{'on the device' if args.views == 'device' else 'in DataLoader workers'}")

    # --- train ------------------------------------------------------------------------------------
    test_loader = eval_loader(data.test, args, device)
    val_loader = eval_loader(data.val, args, device) if data.val is not None else None
    clock = run_clock(args, elapsed_before(ckpt, out / "log.txt", start_epoch) if is_main(args) else 0.0)
    negligible = 0  # epochs in a row with a negligible GBG update
    for epoch in range(start_epoch, args.epochs):
        clock.start_epoch(epoch)
        due = epoch == args.group_epoch or (args.regroup_every and epoch > args.group_epoch
                                            and (epoch - args.group_epoch) % args.regroup_every == 0)
        regroup_ari, groups_before, groups_info_before = None, groups, groups_info
        pending = (ckpt or {}).get("pending_groups") if epoch == start_epoch else None
        if args.grouping != "none" and due and pending is not None and pending["epoch"] == epoch:
            # grouped before a stop in this epoch (see below): the same groups, not an hour's grouping again
            groups, groups_info, regroup_ari = pending["groups"], pending["groups_info"], pending["regroup_ari"]
            if args.num_groups == "auto":  # as chosen at that grouping
                args.num_groups = pending["groups_info"]["num_groups"]
            set_rng_state(pending["rng"])
            log(args, f"groups (epoch {epoch}): as grouped before the stop, from {resume_path} (groups.json)")
        elif args.grouping != "none" and due:  # Stage 1, Algorithm 1
            t0, rng = clock.now(), rng_state()
            groups, groups_info, regroup_ari = group_classes(model, data, args, device, epoch, groups, groups_info)
            clock.grouped(clock.now() - t0)
            if is_main(args) and epoch > 0:  # the last checkpoint again, with these groups for a resume in this epoch
                save_atomic(checkpoint_dict(model, optimizer, epoch - 1, groups_before, groups_info_before, best,
                                            best_test, args, clock.elapsed(), rng,
                                            pending_groups={"epoch": epoch, "groups": groups,
                                                            "groups_info": groups_info, "regroup_ari": regroup_ari,
                                                            "rng": rng_state()}), ckpt_path)
        class_to_group = None if groups is None else torch.as_tensor(groups, device=device)
        sampler = make_sampler(data, groups, args)
        sampler.set_epoch(epoch)
        loader = data_lt.make_loader(data.train, sampler, train=True, device=device, num_workers=args.workers,
                                     seed=args.seed * 100003 + epoch,
                                     views=train_views(data, args))
        stats = train_one_epoch(model, loader, optimizer, epoch, args, class_to_group, device, clock)
        if regroup_ari is not None:
            stats["regroup_ari"] = regroup_ari
        negligible = negligible + 1 if stats.get("update_ratio", 1.0) < NEGLIGIBLE_UPDATE else 0
        if negligible >= NEGLIGIBLE_EPOCHS:
            log(args, f"train.py: warning: the GBG update has been under {NEGLIGIBLE_UPDATE:g} of the plain gradient's "
                      f"size for {negligible} epochs (update_ratio {stats['update_ratio']:.3g} at epoch {epoch}): the "
                      f"model barely moves; see results/README.md, 'The MGDA step and the grouping' (--normalize, --moo-update)")
        average_bn_buffers(model, args)  # what is evaluated, grouped with and saved is one model
        if args.diag_every and (epoch + 1) % args.diag_every == 0:
            t0 = time.time()
            with eager(args):
                stats.update(gradient_diagnostic(model, diag_loader(data, groups, args, device), class_to_group,
                                                 data.class_counts, args, device))
            stats["diag_time_s"] = time.time() - t0
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            stats.update(evaluate_splits(model, test_loader, val_loader, data.class_counts, device, args))
            if val_loader is not None and (best is None or stats["val_top1"] > best["val_top1"]):
                best = {"epoch": epoch, **{k: v for k, v in stats.items() if k.startswith(("val_", "test_"))}}
            if best_test is None or stats["test_top1"] > best_test["top1"]:
                best_test = {"epoch": epoch, **{k[5:]: v for k, v in stats.items() if k.startswith("test_")}}
        if best_test is not None:
            stats.update(best_test_top1=best_test["top1"], best_test_epoch=best_test["epoch"])
        stats.update(epoch=epoch, time_s=clock.elapsed())
        if is_main(args):
            write_json(out / "log.txt", stats, mode="a")
            save_atomic(checkpoint_dict(model, optimizer, epoch, groups, groups_info, best, best_test, args,
                                        stats["time_s"], rng_state()), ckpt_path)
        clock.end_epoch()
        log(args, epoch_line(epoch, stats, clock, args))
        if args.exit_after_epoch is not None and epoch >= args.exit_after_epoch:
            return None

    # --- results ----------------------------------------------------------------------------------
    last = json.loads(log_lines(out / "log.txt")[-1]) if is_main(args) else {}
    results = {"last": {"epoch": last.get("epoch"), **{k[5:]: v for k, v in last.items() if k.startswith("test_")}},
               "best_on_val": best, "best_test": best_test, "protocols": PROTOCOLS,
               "epochs": args.epochs, "args": vars(args)}
    if is_main(args):
        write_json(out / "results.json", results)
    log(args, f"done: {results_line(results)}; {hms(clock.elapsed())}")
    return results


def results_line(results):
    """results.json's accuracies in one line (the last line of a run, and of submit.py's local jobs)."""
    best, best_test = results.get("best_on_val"), results.get("best_test")
    on_val = f"; best on val: test top-1 {best['test_top1']:.2f} (epoch {best['epoch']})" if best else ""
    on_test = f"; best test epoch: test top-1 {best_test['top1']:.2f} (epoch {best_test['epoch']})" if best_test else ""
    return f"last epoch: test top-1 {pct(results['last'].get('top1'))}{on_test}{on_val}"


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def checkpoint_dict(model, optimizer, epoch, groups, groups_info, best, best_test, args, elapsed_s, rng, **more):
    """checkpoint.pth after `epoch`. more: pending_groups, the groups made at the start of epoch + 1
    (saved right after a grouping, so that a run stopped in that epoch resumes without grouping again:
    the same groups, the random state after them, as the grouping is a function of this checkpoint)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "groups": groups,
            "groups_info": groups_info, "best": best, "best_test": best_test, "args": vars(args),
            "elapsed_s": elapsed_s, "rng": rng, **more}


def stop_on_sigterm(signum, frame):
    """SIGTERM (kill, a scheduler's stop) ends a run as Ctrl-C does, with the same line."""
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    args = get_args_parser(add_help=True).parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # here only: submit.py's jobs keep submitit's handlers
    try:
        main(args)
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"  # Ctrl-C raises a bare KeyboardInterrupt
        if getattr(args, "rank", 0) == 0:
            what = "the evaluation" if args.eval else checkpoint_kept(args.output_dir)
            print(f"train.py: stopped by {name}; {what}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.Signals[name])
    except data_lt.UserError as e:
        sys.exit(f"train.py: error: {e}")
    except ValueError as e:
        # gbg.py checks its arguments with ValueError; those that train.py's flags can reach are
        # checked earlier with the flag's name, and any other still ends in one line
        if Path(traceback.extract_tb(e.__traceback__)[-1].filename).name != "gbg.py":
            raise
        sys.exit(f"train.py: error: {e}")
