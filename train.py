"""Train a long-tailed classifier with GBG (Li et al., AAAI 2024), on one GPU, the CPU, or
several processes under torch.distributed (torchrun, or slurm/submit.py through submitit).

    python train.py                                   # CIFAR-10-LT IF 100, ResNet-32, CE+GBG+MOO, GAC
    python train.py --loss bcl                        # BCL+GBG+MOO (the paper's best numbers; see BCL)
    python train.py --dataset synthetic-lt --epochs 2 --output-dir /tmp/demo   # a one-minute CPU demo

Stage 1 (at --group-epoch): class gradients of the current model -> affinity -> NCut groups.
Stage 2: every step, one loss per group, MGDA weights alpha, update along d = sum_i alpha_i g_i.
The output directory holds log.txt (a JSON line per epoch), groups.json, checkpoint.pth (written
atomically every epoch; a run started again with the same --output-dir resumes from it) and
results.json.
"""
import argparse
import atexit
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data_lt
import gbg

# Per-dataset defaults: the paper's CIFAR recipe (= the authors' release) and BCL's recipe for
# the large sets. Any flag given on the command line wins.
PRESETS = {
    "cifar": dict(arch="resnet32", epochs=200, lr=0.1, wd=5e-4, schedule="step", warmup_epochs=5),
    "imagenet-lt": dict(arch="resnet50", epochs=90, lr=0.1, wd=5e-4, schedule="cosine", warmup_epochs=5),
    "inat2018": dict(arch="resnet50", epochs=100, lr=0.1, wd=1e-4, schedule="cosine", warmup_epochs=5),
}


def get_args_parser():
    p = argparse.ArgumentParser("GBG training", add_help=False)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar10-lt",
                   choices=["cifar10-lt", "cifar100-lt", "imagenet-lt", "inat2018", "folder-lt", "synthetic-lt"])
    d.add_argument("--data-root", default="./data", help="folder holding the data set (see README)")
    d.add_argument("--imb-factor", type=float, default=100, help="N_max / N_min of the made-long-tailed sets")
    d.add_argument("--workers", type=int, default=8, help="DataLoader workers (image-file data sets)")
    m = p.add_argument_group("model and optimisation (defaults depend on --dataset)")
    m.add_argument("--arch", default=None, choices=["resnet32", "resnet20", "resnet8", "resnet50", "resnext50_32x4d"],
                   help="resnet8/20: smaller CIFAR ResNets, for quick checks and the tests")
    m.add_argument("--epochs", type=int, default=None)
    m.add_argument("--batch-size", type=int, default=256, help="global batch size, shared by all processes")
    m.add_argument("--lr", type=float, default=None)
    m.add_argument("--wd", type=float, default=None)
    m.add_argument("--momentum", type=float, default=0.9)
    m.add_argument("--schedule", default=None, choices=["step", "cosine"],
                   help="step: x0.1 at 80%% and x0.01 at 90%% of the epochs (160/180 of 200)")
    m.add_argument("--warmup-epochs", type=float, default=None)
    m.add_argument("--loss", default="ce", choices=["ce", "bcl"],
                   help="bcl: logit-adjusted CE + balanced contrastive loss (Zhu et al. 2022), three views")
    m.add_argument("--la-weight", type=float, default=None, help="BCL: weight of the logit-adjusted CE (see BCL_PRESETS)")
    m.add_argument("--bcl-weight", type=float, default=None, help="BCL: weight of the contrastive loss")
    m.add_argument("--bcl-temp", type=float, default=None, help="BCL: temperature of the contrastive loss")
    g = p.add_argument_group("GBG")
    g.add_argument("--num-groups", type=int, default=4)
    g.add_argument("--grouping", default="gbg", choices=["gbg", "random", "count", "none"],
                   help="none with --moo mgda makes every class its own objective")
    g.add_argument("--group-epoch", type=int, default=0, help="epoch at which to group (0: the initial model)")
    g.add_argument("--regroup-every", type=int, default=0, help="regroup every N epochs (0: never)")
    g.add_argument("--sketch-dim", type=int, default=0,
                   help="CountSketch size of the class gradients (0: exact when K*P floats fit in 2 GB, else 16384)")
    g.add_argument("--grad-max-per-class", type=int, default=None, help="cap on samples per class for grouping")
    g.add_argument("--moo", default="mgda", choices=["mgda", "none"],
                   help="none: average the group losses (the paper's 'GBG' ablation)")
    g.add_argument("--moo-grad", default="params", choices=["params", "features"],
                   help="features: MGDA-UB, the Gram of the gradients w.r.t. the shared features")
    # l2 by default: with raw gradients (none) the min-norm point leans on the group with the
    # smallest gradient; a one-class group can zero its loss by predicting its class everywhere,
    # and the run collapses onto it (seen on synthetic-lt and CIFAR-10-LT; see README).
    g.add_argument("--normalize", default="l2", choices=["none", "l2", "loss", "loss+"],
                   help="divide each group gradient by its norm (l2), loss, or both (loss+) before MGDA")
    g.add_argument("--group-loss", default="class", choices=["class", "sample"],
                   help="class: a group's loss is the mean of its classes' mean losses (the paper)")
    g.add_argument("--sampler", default="gac", choices=["random", "gac"])
    g.add_argument("--gac-fill", type=float, default=0.1)
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--output-dir", default="output")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    r.add_argument("--amp", action="store_true", help="bf16 autocast and channels_last on CUDA")
    r.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over the global batch")
    r.add_argument("--eval-every", type=int, default=1)
    r.add_argument("--print-freq", type=int, default=50)
    r.add_argument("--exit-after-epoch", type=int, default=None,
                   help="stop (as if killed) once this epoch's checkpoint is written; for tests")
    return p


# ------------------------------------------------------------------------------------------
# Models: ResNet-32 for CIFAR (He et al. 2016, option-A shortcuts), torchvision's ResNet-50 and
# ResNeXt-50 for ImageNet-LT / iNat. Every model is backbone -> features z -> fc, so that the
# backbone is what class gradients are taken over and z is what MGDA-UB differentiates.
# ------------------------------------------------------------------------------------------
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


class SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a backward: each rank's loss depends on the sum, so the gradient
    w.r.t. a rank's input is the sum over ranks of the gradients w.r.t. the sum."""

    @staticmethod
    def forward(ctx, t):
        return all_reduce_(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone())


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over the batches of all processes.
    nn.SyncBatchNorm only runs on GPUs; this one also runs on the CPU with gloo, through the
    differentiable all_reduce, so that the CPU tests check the multi-process run exactly."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), n_local]))
        n, mean = stats[-1], stats[:-1] / stats[-1]
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly in float32.
        var = SumOverRanks.apply(((x - mean[None, :, None, None]) ** 2).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_bn(module, device):
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module


# ------------------------------------------------------------------------------------------
# Distributed helpers: no DDP wrapper, since the GBG step takes several gradients per step;
# instead every process adds up the same sums, so all apply the update of the global batch.
# ------------------------------------------------------------------------------------------
def init_distributed(args):
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and args.world_size > 1:
        # One GPU per process. A cluster may show each task all of the node's GPUs, one, or a
        # subset (srun --gpu-bind=closest: those of its socket); local_rank modulo what the task
        # sees picks its own in each case (as DeiT's and DINO's init_distributed_mode).
        gpu = args.local_rank % torch.cuda.device_count()
        args.device = f"cuda:{gpu}"
        torch.cuda.set_device(gpu)
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        # without this, gloo's threads can outlive the interpreter and abort the process at exit
        atexit.register(dist.destroy_process_group)
    args.distributed = args.world_size > 1


def is_main(args):
    return args.rank == 0


def all_reduce_(t):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_grads(params):
    """Sum p.grad over the processes, in one flat buffer (one collective per step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def log(args, *msg):
    if is_main(args):
        print(*msg, flush=True)


def previous_checkpoint(path):
    """checkpoint.pth -> checkpoint.prev.pth: the one before, kept by save_atomic."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_atomic(obj, path):
    """Write to a temporary file, fsync it, keep the current file as checkpoint.prev.pth, rename
    the new one into place and fsync the folder. A rename alone is not durable: after a node
    failure the file system may hold the new name with no data yet, and every requeue then fails;
    with the fsyncs the data is on disk before the name points at it, and if the newest file is
    still unreadable the previous one is there to fall back to (see load_resume_checkpoint)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves
    finally:
        os.close(fd)


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
        raise data_lt.LTError(f"no readable checkpoint in {Path(ckpt_path).parent}: {why}; move checkpoint*.pth "
                              f"away to start over, or restore one from a backup")
    if index < 0:
        return None, None
    if not is_main(args):
        ckpt = torch.load(candidates[index], map_location="cpu", weights_only=False)
        if ckpt["epoch"] != epoch:
            raise data_lt.LTError(f"rank {args.rank} reads epoch {ckpt['epoch']} from {candidates[index]} but "
                                  f"rank 0 read epoch {epoch}; the nodes see different files: put --output-dir "
                                  f"on a file system that every node sees the same")
    return ckpt, candidates[index]


def write_json(path, obj, mode="w"):
    with open(path, mode) as f:
        f.write(json.dumps(obj) + "\n")


# ------------------------------------------------------------------------------------------
# ---- BCL: balanced contrastive learning (Zhu et al. 2022), the base method of the paper's best
# numbers (--loss bcl). Classification branch: a cosine classifier (scale 30) trained with
# logit-adjusted CE (Menon et al. 2021, tau = 1: logits + log class prior) on one view.
# Contrastive branch: an MLP head on the backbone features of two more views, plus the class
# prototypes (the classifier weights through a second MLP head), which join every batch.
# Loss: la_weight * LA + bcl_weight * BCL. All three views go through the backbone as one batch,
# as in BCL's release, so BatchNorm sees them together.
# Under GBG the group losses are the LA losses of each group; MGDA combines them into d, and the
# BCL gradient is added to la_weight * d (as in the authors' release: BCL is not an objective
# of MGDA). Grouping uses plain CE of the model's (cosine) logits, not the adjusted ones.
# Distributed: the gradients are summed over processes like every other; the contrastive loss
# itself is per process (each anchor contrasts with its own process's views and the prototypes;
# the processes' losses are averaged), as with BCL's DDP training. The heads' BatchNorm1d
# statistics are per process too (the heads are not used at test time).
# ------------------------------------------------------------------------------------------
# la_weight / bcl_weight / bcl_temp. ImageNet-LT and iNat: 1.0 / 0.35 / 0.07, the defaults of
# BCL's release (the GBG release uses the same on ImageNet-LT). CIFAR: 2.0 / 1.6 / 0.1, the GBG
# release's values, since the paper's BCL (84.07) and BCL+GBG+MOO (85.05) rows are the authors'
# runs with them; BCL's own CIFAR weights (2.0 / 0.6 as we read its paper) are
# --la-weight 2 --bcl-weight 0.6.
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
    and the log class prior of the logit adjustment (a buffer outside the state dict)."""
    D, K = model.fc.in_features, model.fc.out_features
    hidden, out = (D, 1024) if D >= 2048 else (512, 128)
    model.fc = CosineClassifier(D, K)
    model.head, model.head_fc = mlp_head(D, hidden, out), mlp_head(D, hidden, out)
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float32).clamp(min=1)  # no log 0
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
    size = torch.bincount(labels, minlength=K)[labels][None, :] - same.long()
    log_den = torch.logsumexp(torch.where(not_self, s - size.to(s.dtype).log(), float("-inf")), dim=1)
    pos = same & not_self
    return -(torch.where(pos, s, 0.0).sum(1) / pos.sum(1) - log_den).mean()


def bcl_contrast(model, z_views, targets, temperature):
    """BCL loss of the backbone features z_views [V*B, D] of V contrastive views (stacked view
    by view) of the samples with labels targets [B]."""
    emb = F.normalize(model.head(z_views.float()), dim=1)
    prototypes = F.normalize(model.head_fc(model.fc.weight), dim=1)
    return bcl_loss(emb, targets.repeat(len(z_views) // len(targets)), prototypes, temperature)


def bcl_train_views(data):
    size = tuple(data.train.images.shape[-2:]) if data.kind == "tensor" else 224
    return data_lt.bcl_views(data.kind, data.mean, data.std, size)


def add_contrast_grad(contrast, params, la_weight):
    """p.grad <- la_weight * p.grad + d(contrast)/dp, the new part summed over the processes
    (mgda_backward all-reduces only the direction it adds; p.grad holds that direction)."""
    grads = torch.autograd.grad(contrast, params, allow_unused=True)
    flat = all_reduce_(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                  for p, g in zip(params, grads)]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.mul_(la_weight).add_(g.view_as(p))


# ------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then step (x0.1 at 80 %, x0.01 at 90 % of the epochs: 160/180
# of 200, the CIFAR recipe) or cosine decay. A function of the epoch alone, so resume is exact.
# ------------------------------------------------------------------------------------------
def lr_at(epoch, args):
    if epoch < args.warmup_epochs:
        return args.lr * (epoch + 1e-3) / args.warmup_epochs
    if args.schedule == "step":
        return args.lr * (0.01 if epoch >= 0.9 * args.epochs else 0.1 if epoch >= 0.8 * args.epochs else 1.0)
    t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.lr * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------
# Stage 1: grouping (Algorithm 1)
# ------------------------------------------------------------------------------------------
def make_groups(model, data, args, device):
    """Class -> group ids (np.int64[K]) by --grouping, identical on every process."""
    K, G = data.num_classes, args.num_groups
    if args.grouping == "random":
        return gbg.random_groups(K, G, seed=args.seed), None
    if args.grouping == "count":
        return gbg.count_groups(data.class_counts, G), None
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    P = sum(p.numel() for p in backbone)
    sketch = args.sketch_dim or (None if K * P * 4 <= 2e9 else 16384)
    # Every process takes its share of the classes and the rows are summed on rank 0 (D = P or
    # the sketch size, never both). Rank 0 alone builds the affinity (O(K^2 D)) and solves the
    # NCut, then broadcasts the groups, so no process can disagree.
    mine = range(args.rank, K, args.world_size)
    t0 = time.time()
    grads = gbg.class_gradients(model, data.train_eval, K, params=backbone, classes=mine,
                                sketch_dim=sketch, max_per_class=args.grad_max_per_class,
                                device=device, seed=args.seed,
                                num_workers=0 if data.kind == "tensor" else min(args.workers, 4),
                                worker_init_fn=data_lt.worker_init)
    grads = grads.to(device)
    if args.distributed:
        dist.reduce(grads, dst=0)
    A, groups = None, torch.zeros(K, dtype=torch.long, device=device)
    if is_main(args):
        A = gbg.affinity(grads.cpu())
        groups = torch.as_tensor(gbg.ncut_groups(A, G, seed=args.seed), dtype=torch.long, device=device)
    if args.distributed:
        dist.broadcast(groups, 0)
    log(args, f"grouping: class gradients over {P:,} backbone parameters"
              f"{f' (sketch {sketch})' if sketch else ''} in {time.time() - t0:.1f}s")
    return groups.cpu().numpy(), A


def describe_groups(groups, A, data, args, epoch):
    G = int(groups.max()) + 1
    members = [np.flatnonzero(groups == i).tolist() for i in range(G)]
    return {"epoch": epoch, "grouping": args.grouping, "num_groups": G, "groups": members,
            "counts": [data.class_counts[m].tolist() for m in members],
            "ncut": None if A is None else gbg.ncut_value(A, groups)}


def make_sampler(data, groups, args):
    """GAC batches when groups exist; otherwise plain shuffled batches. A single group is never
    missing, so GACBatchSampler with one group is exactly a sharded random batch sampler: the
    union of the processes' batches is the one-process batch, which the equivalence test needs."""
    labels = np.asarray(data.train.targets)
    use_gac = args.sampler == "gac" and groups is not None
    return gbg.GACBatchSampler(labels, groups if use_gac else np.zeros(data.num_classes, dtype=np.int64),
                               args.batch_size // args.world_size, fill=args.gac_fill, seed=args.seed,
                               num_replicas=args.world_size, rank=args.rank)


# ------------------------------------------------------------------------------------------
# Stage 2: training (Algorithm 2) and evaluation
# ------------------------------------------------------------------------------------------
def train_one_epoch(model, loader, optimizer, epoch, args, class_to_group, device):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    K = model.fc.out_features
    G = 0 if class_to_group is None else int(class_to_group.max()) + 1
    use_moo = class_to_group is not None and args.moo == "mgda"
    bcl, bcl_sum = args.loss == "bcl", torch.zeros(1, dtype=torch.float64)
    # MGDA's Gram is over what the group losses reach: not the BCL heads (zero blocks there)
    moo_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(BCL_HEADS)]
    sums = torch.zeros(3, dtype=torch.float64)  # loss, samples, steps
    alpha_sum, alpha_n, cos_min = torch.zeros(max(G, 1), dtype=torch.float64), torch.zeros(max(G, 1)), 1.0
    t0, n_seen = time.time(), 0
    for step, (x, y) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch + step / len(loader), args)
        if bcl:  # [classification view, contrastive view, contrastive view]: one batch (see BCL)
            x = torch.cat(x)
        if args.amp and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            z = model.forward_features(x)
            z_cls = z[:len(y)]
            logits = model.fc(z_cls)
        logits = logits.float()
        adjusted, contrast = logits, None
        if bcl:  # the contrastive loss is per process; /world_size, as the gradients are summed
            adjusted = logits + model.log_prior
            contrast = args.bcl_weight * bcl_contrast(model, z[len(y):], y, args.bcl_temp) / args.world_size
            bcl_sum += contrast.item()
        # Class counts of the global batch: every loss is normalised by them, so that the sum
        # over processes of the local losses is the loss of the global batch.
        counts = all_reduce_(torch.bincount(y, minlength=K))
        optimizer.zero_grad(set_to_none=True)
        if class_to_group is None:  # plain CE (BCL: la_weight * LA + bcl_weight * BCL)
            loss = F.cross_entropy(adjusted, y, reduction="sum") / counts.sum()
            if bcl:
                loss = args.la_weight * loss + contrast
            loss.backward()
            all_reduce_grads(params)
            total = loss.detach()
        else:
            losses, present = gbg.group_losses(adjusted, y, class_to_group, G, mode=args.group_loss,
                                               class_counts=counts)
            idx = present.nonzero().flatten().tolist()
            if use_moo:
                alpha, gram = gbg.mgda_backward([losses[i] for i in idx], moo_params, normalize=args.normalize,
                                                features=z_cls if args.moo_grad == "features" else None,
                                                return_gram=True, retain_graph=bcl)
                if bcl:  # p.grad = la_weight * d + the BCL gradient (see BCL)
                    add_contrast_grad(contrast, params, args.la_weight)
                diag = gbg.step_diagnostic(gram, alpha, [losses[i] for i in idx])
                alpha_sum[idx] += alpha.detach().double().cpu()
                alpha_n[idx] += 1
                cos_min = min(cos_min, min(diag["cos"]))
            else:  # the paper's "average strategy": equal weights on the groups present
                average = losses[idx].mean()
                (args.la_weight * average + contrast if bcl else average).backward()
                all_reduce_grads(params)
            total = F.cross_entropy(adjusted.detach(), y, reduction="sum") / counts.sum()
            if bcl:
                total = args.la_weight * total + contrast.detach()
        total = all_reduce_(total.clone())  # the global batch's loss, on every process
        sums += torch.tensor([total.item(), counts.sum().item(), 1.0], dtype=torch.float64)
        if not math.isfinite(sums[0]):
            raise data_lt.LTError(f"loss is {sums[0]} at epoch {epoch} step {step}: lower --lr (now {args.lr}) or "
                                  f"drop --amp; the last good checkpoint in {args.output_dir} is kept")
        optimizer.step()
        n_seen += int(counts.sum())
        if is_main(args) and (step % args.print_freq == 0 or step == len(loader) - 1):
            rate = n_seen / max(time.time() - t0, 1e-9)
            eta = (len(loader) - step - 1) * (time.time() - t0) / (step + 1)
            print(f"epoch {epoch} [{step + 1}/{len(loader)}] loss {total.item():.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.4g} {rate:.0f} img/s eta {eta:.0f}s", flush=True)
    stats = {"train_loss": sums[0].item() / sums[2].item(), "lr": optimizer.param_groups[0]["lr"],
             "images_per_s": n_seen / max(time.time() - t0, 1e-9), "train_time_s": time.time() - t0}
    if use_moo:
        stats["alpha_mean"] = (alpha_sum / alpha_n.clamp(min=1)).tolist()
        stats["cos_d_g_min"] = cos_min
    if bcl:  # the unweighted contrastive loss, averaged over steps and processes
        stats["train_bcl_loss"] = all_reduce_(bcl_sum.to(device)).item() / (sums[2].item() * args.bcl_weight)
    return stats


@torch.no_grad()
def evaluate(model, loader, class_counts, device, args):
    """Top-1 over the whole split and over the Many / Medium / Few classes (by training count)."""
    model.eval()
    K = len(class_counts)
    correct = torch.zeros(K, dtype=torch.float64, device=device)
    total = torch.zeros(K, dtype=torch.float64, device=device)
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            pred = model(x).argmax(1)
        total += torch.bincount(y, minlength=K).double()
        correct += torch.bincount(y[pred == y], minlength=K).double()
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


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def fill_defaults(args):
    preset = PRESETS.get(args.dataset, PRESETS["cifar"])
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch_size % args.world_size:
        raise data_lt.LTError(f"--batch-size {args.batch_size} is not divisible by the {args.world_size} processes; "
                              f"pick a multiple of {args.world_size}")


def main(args):
    # ---------------------------------------------------------------- setup
    init_distributed(args)
    fill_defaults(args)
    if args.loss == "bcl":
        fill_bcl_defaults(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output_dir)
    if is_main(args):
        out.mkdir(parents=True, exist_ok=True)
    log(args, f"run: {args.dataset} IF {args.imb_factor:g}, {args.arch}, {args.epochs} epochs, batch {args.batch_size} "
              f"over {args.world_size} process(es), lr {args.lr} {args.schedule} (warm-up {args.warmup_epochs}), "
              f"wd {args.wd}; loss {args.loss}, grouping {args.grouping} (G={args.num_groups}), moo {args.moo} "
              f"({args.moo_grad}, normalize {args.normalize}), sampler {args.sampler}; device {device}")

    # ---------------------------------------------------------------- data
    data = data_lt.build_data(args.dataset, args.data_root, imb_factor=args.imb_factor, seed=args.seed)
    K = data.num_classes
    if args.grouping != "none" and not 1 <= args.num_groups <= K:
        raise data_lt.LTError(f"--num-groups {args.num_groups} must be between 1 and the {K} classes of {args.dataset}")
    if data.kind == "tensor":  # CIFAR-sized: the whole set lives on the device, augmented there
        same = data.train_eval is data.train
        data.train, data.test = data.train.to(device), data.test.to(device)
        data.train_eval = data.train if same else data.train_eval.to(device)
        if data.val is not None:
            data.val = data.val.to(device)
    log(args, f"data: {len(data.train)} training images in {K} classes (largest {data.class_counts.max()}, "
              f"smallest {data.class_counts.min()}), {len(data.test)} test images")

    # ---------------------------------------------------------------- model
    model = build_model(args.arch, K)
    if args.loss == "bcl":
        model = make_bcl_model(model, data.class_counts)
        log(args, f"bcl: {args.la_weight} * logit-adjusted CE + {args.bcl_weight} * BCL (temperature {args.bcl_temp})")
    if args.sync_bn and args.distributed:
        model = convert_sync_bn(model, device)
    model.to(device)
    if args.amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.distributed:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

    # ---------------------------------------------------------------- resume
    start_epoch, groups, best, ckpt_path = 0, None, None, out / "checkpoint.pth"
    ckpt, resume_path = load_resume_checkpoint(ckpt_path, args)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, groups, best = ckpt["epoch"] + 1, ckpt["groups"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        log(args, f"resumed from {resume_path} at epoch {start_epoch}")
        if is_main(args) and (out / "log.txt").exists():  # drop lines of epochs that will run again
            lines = [l for l in open(out / "log.txt") if json.loads(l)["epoch"] < start_epoch]
            (out / "log.txt").write_text("".join(lines))
    elif is_main(args) and (out / "log.txt").exists():  # killed before its first checkpoint
        (out / "log.txt").unlink()
    if args.grouping == "none" and args.moo == "mgda":
        groups = np.arange(K)  # every class its own objective (the paper's "MOO" ablation)

    # ---------------------------------------------------------------- train
    test_loader = eval_loader(data.test, args, device)
    val_loader = eval_loader(data.val, args, device) if data.val is not None else None
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        due = epoch == args.group_epoch or (args.regroup_every and epoch > args.group_epoch
                                            and (epoch - args.group_epoch) % args.regroup_every == 0)
        if args.grouping != "none" and due:
            groups, A = make_groups(model, data, args, device)
            info = describe_groups(groups, A, data, args, epoch)
            log(args, f"groups (epoch {epoch}): sizes {[len(m) for m in info['groups']]}, Eq. 9 value {info['ncut']}")
            if is_main(args):
                write_json(out / "groups.json", info)
        class_to_group = None if groups is None else torch.as_tensor(groups, device=device)
        sampler = make_sampler(data, groups, args)
        sampler.set_epoch(epoch)
        loader = data_lt.make_loader(data.train, sampler, train=True, device=device, num_workers=args.workers,
                                     seed=args.seed * 100003 + epoch,
                                     views=bcl_train_views(data) if args.loss == "bcl" else None)
        stats = train_one_epoch(model, loader, optimizer, epoch, args, class_to_group, device)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            stats.update({f"test_{k}": v for k, v in evaluate(model, test_loader, data.class_counts, device, args).items()})
            if val_loader is not None:
                stats.update({f"val_{k}": v for k, v in evaluate(model, val_loader, data.class_counts, device, args).items()})
                if best is None or stats["val_top1"] > best["val_top1"]:
                    best = {"epoch": epoch, **{k: v for k, v in stats.items() if k.startswith(("val_", "test_"))}}
        stats.update(epoch=epoch, time_s=time.time() - t_start)
        if is_main(args):
            write_json(out / "log.txt", stats, mode="a")
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "groups": groups, "best": best, "args": vars(args),
                         "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate()}}, ckpt_path)
        log(args, f"epoch {epoch}: test top-1 {stats.get('test_top1', float('nan')):.2f} "
                  f"(many {stats.get('test_many')}, medium {stats.get('test_medium')}, few {stats.get('test_few')})")
        if args.exit_after_epoch is not None and epoch >= args.exit_after_epoch:
            return None

    # ---------------------------------------------------------------- results
    last = [json.loads(line) for line in open(out / "log.txt")][-1] if is_main(args) else {}
    results = {"last": {k[5:]: v for k, v in last.items() if k.startswith("test_")}, "best_on_val": best,
               "epochs": args.epochs, "args": vars(args)}
    if is_main(args):
        write_json(out / "results.json", results)
    log(args, f"done: last-epoch test top-1 {results['last'].get('top1')}; {datetime.timedelta(seconds=int(time.time() - t_start))}")
    return results


if __name__ == "__main__":
    args = argparse.ArgumentParser("GBG training", parents=[get_args_parser()]).parse_args()
    try:
        main(args)
    except data_lt.LTError as e:
        sys.exit(f"train.py: error: {e}")
