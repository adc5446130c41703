"""Train a long-tailed classifier with GBG (Li et al., AAAI 2024), on one GPU, the CPU, or
several processes under torch.distributed (torchrun, or slurm/submit.py through submitit).

    python train.py                                   # CIFAR-10-LT IF 100, ResNet-32, CE+GBG+MOO, GAC
    python train.py --dataset synthetic-lt --epochs 2 --output-dir /tmp/demo   # a one-minute CPU demo

Stage 1 (at --group-epoch): class gradients of the current model -> affinity -> NCut groups.
Stage 2: every step, one loss per group, MGDA weights alpha, update along d = sum_i alpha_i g_i.
The output directory holds log.txt (a JSON line per epoch), groups.json, checkpoint.pth (written
atomically every epoch; a run started again with the same --output-dir resumes from it) and
results.json.
"""
import argparse
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
    m.add_argument("--loss", default="ce", choices=["ce"])
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
    g.add_argument("--normalize", default="none", choices=["none", "l2", "loss", "loss+"])
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
        args.device = f"cuda:{args.local_rank}"
        torch.cuda.set_device(args.local_rank)
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
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


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never loses the last checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj, mode="w"):
    with open(path, mode) as f:
        f.write(json.dumps(obj) + "\n")


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
    # Every process takes its share of the classes; the rows are summed, so each process
    # holds the whole K x D matrix (D = P or the sketch size, never both).
    mine = range(args.rank, K, args.world_size)
    t0 = time.time()
    grads = gbg.class_gradients(model, data.train_eval, K, params=backbone, classes=mine,
                                sketch_dim=sketch, max_per_class=args.grad_max_per_class,
                                device=device, seed=args.seed,
                                num_workers=0 if data.kind == "tensor" else min(args.workers, 4))
    grads = all_reduce_(grads.to(device)).cpu()
    A = gbg.affinity(grads)
    groups = torch.as_tensor(gbg.ncut_groups(A, G, seed=args.seed)).to(device)
    if args.distributed:  # rank 0's eigen-solve decides, so no process can disagree
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
    sums = torch.zeros(3, dtype=torch.float64)  # loss, samples, steps
    alpha_sum, alpha_n, cos_min = torch.zeros(max(G, 1), dtype=torch.float64), torch.zeros(max(G, 1)), 1.0
    t0, n_seen = time.time(), 0
    for step, (x, y) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch + step / len(loader), args)
        if args.amp and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            z = model.forward_features(x)
            logits = model.fc(z)
        logits = logits.float()
        # Class counts of the global batch: every loss is normalised by them, so that the sum
        # over processes of the local losses is the loss of the global batch.
        counts = all_reduce_(torch.bincount(y, minlength=K))
        optimizer.zero_grad(set_to_none=True)
        if class_to_group is None:  # plain CE
            loss = F.cross_entropy(logits, y, reduction="sum") / counts.sum()
            loss.backward()
            all_reduce_grads(params)
            total = loss.detach()
        else:
            losses, present = gbg.group_losses(logits, y, class_to_group, G, mode=args.group_loss,
                                               class_counts=counts)
            idx = present.nonzero().flatten().tolist()
            if use_moo:
                alpha, gram = gbg.mgda_backward([losses[i] for i in idx], params, normalize=args.normalize,
                                                features=z if args.moo_grad == "features" else None,
                                                return_gram=True)
                diag = gbg.step_diagnostic(gram, alpha, [losses[i] for i in idx])
                alpha_sum[idx] += alpha.detach().double().cpu()
                alpha_n[idx] += 1
                cos_min = min(cos_min, min(diag["cos"]))
            else:  # the paper's "average strategy": equal weights on the groups present
                losses[idx].mean().backward()
                all_reduce_grads(params)
            total = F.cross_entropy(logits.detach(), y, reduction="sum") / counts.sum()
        sums += torch.tensor([all_reduce_(total.clone()).item(), counts.sum().item(), 1.0], dtype=torch.float64)
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
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, groups, best = ckpt["epoch"] + 1, ckpt["groups"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        log(args, f"resumed from {ckpt_path} at epoch {start_epoch}")
        if is_main(args) and (out / "log.txt").exists():  # drop lines of epochs that will run again
            lines = [l for l in open(out / "log.txt") if json.loads(l)["epoch"] < start_epoch]
            (out / "log.txt").write_text("".join(lines))
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
                                     seed=args.seed * 100003 + epoch)
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
