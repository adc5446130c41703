"""Measurements behind train.py's grouping and MGDA defaults, on a real long-tailed set: CIFAR-10
image folders (train/<class>/*.jpg, test/<class>/*.jpg) made long-tailed by folder-lt, IF 100,
ResNet-32, batch 256. Not a test (pytest does not collect study_*): it prints and writes JSON.

    python tests/study_gbg.py grouping --data-root DIR --out results/study/grouping.json
    python tests/study_gbg.py steps --data-root DIR --epochs 2 --out results/study/steps.json

grouping: for each seed (the model's initialisation and the k-means seed; the long-tailed subset
    stays fixed), the groups from the class gradients at epoch 0 without and with BatchNorm
    recalibration, and after the 5-epoch CE warm-up (what --group-epoch 5 does) with it; per
    condition the mean max-softmax of the outputs the gradients see, the range of the
    class-gradient norms, and the agreement of the groups across seeds (adjusted Rand index).
steps: trains with train.py's defaults (CE+GBG+MOO, GAC, normalize l2, update scaled) and, at
    every step, takes the G group gradients and the gradient of the plain sample-mean loss once
    (G + 1 backward passes), then derives from them, on the same batches and weights:
    - update_ratio = |d| / |g_mean| of every --normalize x --moo-update rule;
    - the alpha of --moo-grad last (the Gram of the last stage + classifier, a column block of
      the same gradients) against the exact alpha (mean L1 gap);
    - the alpha that --moo-every k would still be using against the exact alpha.
"""
import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.special import comb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_lt  # noqa: E402
import gbg  # noqa: E402
import train  # noqa: E402

NORMALIZE = ["none", "l2", "loss", "loss+"]
UPDATES = ["scaled", "raw", "normalized"]
EVERY = [2, 4, 8]


def adjusted_rand(a, b):
    """Adjusted Rand index of two partitions (Hubert & Arabie 1985): 1 = identical, ~0 = chance."""
    a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = comb(table, 2).sum()
    rows, cols, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    expected = rows * cols / total
    top = (rows + cols) / 2
    return float((pairs - expected) / (top - expected)) if top != expected else 1.0


def train_args(study, seed, extra=()):
    args = train.get_args_parser().parse_args(
        ["--dataset", "folder-lt", "--data-root", study.data_root, "--seed", str(seed), "--device", study.device,
         "--workers", "0", "--print-freq", "10", "--output-dir", "unused", *extra])
    args.rank, args.world_size, args.local_rank, args.distributed = 0, 1, 0, False
    train.fill_defaults(args)
    return args


def epoch_loader(data, groups, args, epoch, device):
    sampler = train.make_sampler(data, groups, args)
    sampler.set_epoch(epoch)
    return data_lt.make_loader(data.train, sampler, train=True, device=device, num_workers=0,
                               seed=args.seed * 100003 + epoch)


def grouping_study(study, data, device):
    conditions = ["epoch0", "epoch0_recalibrated", "warmup_end_recalibrated"]
    runs = {c: [] for c in conditions}
    for seed in study.seeds:
        args = train_args(study, seed)
        torch.manual_seed(seed)
        model = train.build_model(args.arch, data.num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        for cond in conditions:
            if cond.startswith("warmup_end"):  # --group-epoch 5: the warm-up epochs train plain CE first
                for epoch in range(int(args.warmup_epochs)):
                    stats = train.train_one_epoch(model, epoch_loader(data, None, args, epoch, device), optimizer,
                                                  epoch, args, None, device)
                    print(f"seed {seed} warm-up epoch {epoch}: loss {stats['train_loss']:.3f}", flush=True)
            args.recalibrate_bn = cond.endswith("recalibrated")
            t0 = time.time()
            groups, A, stats = train.make_groups(model, data, args, device)
            runs[cond].append({"seed": seed, "groups": groups.tolist(), "ncut": gbg.ncut_value(A, groups),
                               "seconds": time.time() - t0, **stats})
            print(f"seed {seed} {cond}: groups {groups.tolist()} {stats}", flush=True)
    summary = {}
    for cond, rs in runs.items():
        aris = [adjusted_rand(a["groups"], b["groups"]) for a, b in itertools.combinations(rs, 2)]
        summary[cond] = {"ari_mean": float(np.mean(aris)), "ari": aris,
                         "max_softmax_mean": [r["max_softmax_mean"] for r in rs],
                         "class_grad_norm_range": [[r["class_grad_norm_min"], r["class_grad_norm_max"]] for r in rs]}
        confidence = ", ".join(f"{r['max_softmax_mean']:.5f}" for r in rs)
        norms = "; ".join(f"{r['class_grad_norm_min']:.3g}..{r['class_grad_norm_max']:.3g}" for r in rs)
        agreement = ", ".join(f"{x:.2f}" for x in aris)
        print(f"{cond:>24}: ARI across seeds {np.mean(aris):.3f} ({agreement}); max-softmax {confidence}; "
              f"grad norms {norms}")
    return {"runs": runs, "summary": summary}


def column_mask(params, subset):
    keep = {id(p) for p in subset}
    return torch.cat([torch.full((p.numel(),), id(p) in keep) for p in params])


def steps_study(study, data, device):
    args = train_args(study, study.seeds[0])
    torch.manual_seed(args.seed)
    model = train.build_model(args.arch, data.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    last = column_mask(params, train.last_stage_params(model) + list(model.fc.parameters())).to(device)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    groups, _, gstats = train.make_groups(model, data, args, device)
    print(f"groups {groups.tolist()} {gstats}", flush=True)
    c2g = torch.as_tensor(groups, device=device)
    G, K = int(groups.max()) + 1, data.num_classes
    epochs = []
    for epoch in range(study.epochs):
        loader = epoch_loader(data, groups, args, epoch, device)
        ratio = {f"{n}/{u}": [] for n in NORMALIZE for u in UPDATES}
        gap_last, gap_every, stored = [], {k: [] for k in EVERY}, {}
        t0 = time.time()
        for step, (x, y) in enumerate(loader):
            if study.max_steps and step >= study.max_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = train.lr_at(epoch + step / len(loader), args)
            counts = torch.bincount(y, minlength=K)
            logits, mean_loss, _, _ = train.batch_losses(model, x, y, counts, args, device)
            losses, present = gbg.group_losses(logits, y, c2g, G, mode=args.group_loss, class_counts=counts)
            idx = present.nonzero().flatten().tolist()
            flat = gbg.group_gradients([mean_loss] + [losses[i] for i in idx], params)
            gram = flat.double() @ flat.double().T
            g_mean, raw, flat = gram[0, 0].sqrt(), gram[1:, 1:], flat[1:]
            values = torch.stack([losses[i].detach() for i in idx]).double()
            for n in NORMALIZE:
                for u in UPDATES:
                    _, w, _ = gbg.mgda_weights(raw, values, normalize=n, update=u)
                    ratio[f"{n}/{u}"].append(((w @ raw @ w).sqrt() / g_mean).item())
            alpha, w, _ = gbg.mgda_weights(raw, values, normalize=args.normalize, update=args.moo_update)
            sub = flat[:, last].double()
            alpha_last, _, _ = gbg.mgda_weights(sub @ sub.T, values, normalize=args.normalize)
            gap_last.append((alpha_last - alpha).abs().sum().item())
            for k in EVERY:
                if step % k == 0 or stored.get(k, (None,))[0] != idx:
                    stored[k] = (idx, alpha)
                else:
                    gap_every[k].append((stored[k][1] - alpha).abs().sum().item())
            d = w.to(flat.dtype) @ flat  # train.py's default step, from the same gradients
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, d.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
            optimizer.step()
            if step % 10 == 0:
                print(f"epoch {epoch} step {step}/{len(loader)}: loss {mean_loss.item():.3f} alpha "
                      f"{[round(a, 3) for a in alpha.tolist()]} ratio l2/scaled {ratio['l2/scaled'][-1]:.3f} "
                      f"l2/normalized {ratio['l2/normalized'][-1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
        row = {"epoch": epoch, "steps": len(gap_last),
               "update_ratio": {k: float(np.mean(v)) for k, v in ratio.items()},
               "update_ratio_range": {k: [float(np.min(v)), float(np.max(v))] for k, v in ratio.items()},
               "alpha_gap_last": float(np.mean(gap_last)),
               "alpha_gap_every": {k: float(np.mean(v)) if v else None for k, v in gap_every.items()}}
        epochs.append(row)
        print(json.dumps(row), flush=True)
    return {"groups": groups.tolist(), "grouping": gstats, "epochs": epochs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["grouping", "steps"])
    p.add_argument("--data-root", required=True, help="image folders with train/ and test/ (folder-lt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="steps: epochs of training measured")
    p.add_argument("--max-steps", type=int, default=0, help="steps: at most this many steps an epoch (0: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results here as JSON")
    study = p.parse_args()
    torch.set_num_threads(study.threads)
    device = torch.device(study.device)
    t0 = time.time()
    data = data_lt.build_data("folder-lt", study.data_root, imb_factor=100, seed=0)
    if data.kind == "tensor":  # as train.main: CIFAR-sized images live on the device
        same = data.train_eval is data.train
        data.train, data.test = data.train.to(device), data.test.to(device)
        data.train_eval = data.train if same else data.train_eval.to(device)
    res = grouping_study(study, data, device) if study.part == "grouping" else steps_study(study, data, device)
    res["setup"] = {"data": f"folder-lt {study.data_root} IF 100, {len(data.train)} images, K={data.num_classes}",
                    "device": str(device), "threads": study.threads, "seconds": time.time() - t0,
                    "torch": torch.__version__}
    if study.out:
        os.makedirs(os.path.dirname(os.path.abspath(study.out)), exist_ok=True)
        with open(study.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
