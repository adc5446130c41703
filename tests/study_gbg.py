"""Measurements behind train.py's grouping and MGDA defaults, on a real long-tailed set: CIFAR-10
image folders (train/<class>/*.jpg, test/<class>/*.jpg) made long-tailed by folder-lt, IF 100,
ResNet-32, batch 256. Not a test (pytest does not collect study_*): it prints and writes JSON.

    python tests/study_gbg.py grouping --data-root DIR --out results/study/grouping.json
    python tests/study_gbg.py steps --data-root DIR --epochs 2 --out results/study/steps.json
    python tests/study_gbg.py alpha --data-root DIR --checkpoints A.pth B.pth --out results/study/alpha.json

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
alpha: for each checkpoint of an exact run (train.py's checkpoint.pth, its own args), on the same
    fixed batches of the run's sampler (DIAG_SEED, as --diag-every: no augmentation, BatchNorm on
    batch statistics as in a step), the weights the exact step and the cheaper steps would take:
    - --moo-grad features (MGDA-UB, gbg.mgda_backward_features: Gram of [dL_i/dz, dL_i/dfc]), also
      with --moo-gram backbone (z alone: a diagonal Gram) and --moo-grad last, each against the
      exact alpha and the exact step weights w (L1 gaps);
    - each one's direction d = sum_i w_i g_i over the parameters: cos(d, d_exact), its smallest
      cos(d, g_i) over the groups (< 0: it raises a group's loss, which the exact step never does),
      |d| / |d_exact|;
    - for scale, the L1 gap between the exact alphas of consecutive batches at the same weights.
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


def checkpoint_args(ckpt, study):
    """The run's own arguments, on this machine: its data under --data-root, fp32, one process."""
    args = argparse.Namespace(**ckpt["args"])
    args.data_root, args.device, args.amp, args.compile = study.data_root, study.device, False, False
    args.rank, args.world_size, args.local_rank, args.distributed = 0, 1, 0, False
    return args


def direction_stats(w, flat, d_exact):
    """cos(d, d_exact), min_i cos(d, g_i) and |d| / |d_exact| for d = sum_i w_i g_i."""
    d = w.to(flat) @ flat
    cos_g = (flat @ d) / (flat.norm(dim=1) * d.norm()).clamp(min=1e-300)
    return {"cos_exact": float(d @ d_exact / (d.norm() * d_exact.norm()).clamp(min=1e-300)),
            "min_cos_group": float(cos_g.min()), "norm_ratio": float(d.norm() / d_exact.norm())}


def alpha_study(study, device):
    cache, out = {}, []
    for path in study.checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        args = checkpoint_args(ckpt, study)
        key = (args.dataset, args.imb_factor, args.data_seed)
        if key not in cache:
            cache[key] = data_lt.build_data(args.dataset, args.data_root, imb_factor=args.imb_factor,
                                            seed=args.data_seed)
        data = cache[key]
        K = data.num_classes
        model = train.build_model(args.arch, K)
        if args.loss == "bcl":
            model = train.make_bcl_model(model, data.class_counts)
        model.load_state_dict(ckpt["model"])
        model.to(device).train()  # batch statistics, as in a step; nothing here is saved
        groups = np.asarray(ckpt["groups"])
        c2g, G = torch.as_tensor(groups, device=device), int(groups.max()) + 1
        params = train.moo_parameters(model)
        fc = list(model.fc.parameters())
        last = column_mask(params, train.last_stage_params(model) + fc).to(device)
        sampler = train.make_sampler(data, groups, args, seed=train.DIAG_SEED)
        sampler.set_epoch(0)
        batches = [b for b, _ in zip(sampler, range(study.batches))]
        loader = data_lt.make_loader(data.train_eval, batches, train=False, device=device, num_workers=0)
        rows, prev, t0 = [], None, time.time()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            z = model.forward_features(x)
            logits = model.fc(z)
            if args.loss == "bcl" and args.bcl_group_loss == "la":  # train.batch_losses' group logits
                logits = logits + model.log_prior
            counts = gbg.count_labels(y, K)
            losses, present = gbg.group_losses(logits, y, c2g, G, mode=args.group_loss, class_counts=counts)
            L = [losses[i] for i in present.nonzero().flatten().tolist()]
            values = torch.stack([l.detach() for l in L]).double()
            flat = gbg.group_gradients(L, params, retain_graph=True).double()
            cols = flat if args.moo_gram == "all" else flat[:, :-sum(p.numel() for p in fc)]
            alpha, w, _ = gbg.mgda_weights(cols @ cols.T, values, normalize=args.normalize, update=args.moo_update)
            d_exact = w.to(flat) @ flat
            row = {"groups": len(L)}
            for name, gram_params in (("features", fc), ("features_backbone", [])):
                res = gbg.mgda_backward_features(L, z, params, gram_params=gram_params, normalize=args.normalize,
                                                 update=args.moo_update, retain_graph=True)
                model.zero_grad(set_to_none=True)
                row[name] = {"alpha_gap": float((res["alpha"] - alpha).abs().sum()),
                             "weight_gap": float((res["weights"] - w).abs().sum()),
                             **direction_stats(res["weights"], flat, d_exact)}
            sub = flat[:, last]
            a_last, w_last, _ = gbg.mgda_weights(sub @ sub.T, values, normalize=args.normalize, update=args.moo_update)
            row["last"] = {"alpha_gap": float((a_last - alpha).abs().sum()),
                           "weight_gap": float((w_last - w).abs().sum()), **direction_stats(w_last, flat, d_exact)}
            row["exact"] = {"alpha": alpha.tolist(), **direction_stats(w, flat, d_exact)}
            row["exact_batch_gap"] = None if prev is None or len(prev) != len(alpha) else \
                float((prev - alpha).abs().sum())
            prev = alpha
            rows.append(row)
        summary = {"checkpoint": path, "epoch": ckpt["epoch"], "arch": args.arch, "loss": args.loss,
                   "group_loss": args.group_loss, "batches": len(rows), "seconds": time.time() - t0}
        gaps = [r["exact_batch_gap"] for r in rows if r["exact_batch_gap"] is not None]
        summary["exact_batch_gap"] = float(np.mean(gaps)) if gaps else None
        summary["exact_min_cos_group"] = float(np.min([r["exact"]["min_cos_group"] for r in rows]))
        for mode in ("features", "features_backbone", "last"):
            vals = {k: [r[mode][k] for r in rows] for k in rows[0][mode]}
            summary[mode] = {**{k: float(np.mean(v)) for k, v in vals.items()},
                             "min_cos_group_min": float(np.min(vals["min_cos_group"])),
                             "raises_a_group": int(sum(v < 0 for v in vals["min_cos_group"]))}
        print(f"{os.path.basename(path)}: epoch {ckpt['epoch']} ({args.arch}, "
              f"{args.loss}, group loss {args.group_loss}), {len(rows)} batches, {time.time() - t0:.0f}s; "
              f"exact alpha batch-to-batch gap {summary['exact_batch_gap']:.3f}", flush=True)
        for mode in ("features", "features_backbone", "last"):
            m = summary[mode]
            print(f"  {mode:>17}: alpha gap {m['alpha_gap']:.3f}, w gap {m['weight_gap']:.3f}, cos(d, d_exact) "
                  f"{m['cos_exact']:.4f}, min cos(d, g_i) mean {m['min_cos_group']:.3f} min {m['min_cos_group_min']:.3f} "
                  f"({m['raises_a_group']}/{len(rows)} batches raise a group), |d|/|d_exact| {m['norm_ratio']:.3f}",
                  flush=True)
        out.append({"summary": summary, "batches": rows})
    return {"checkpoints": out}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["grouping", "steps", "alpha"])
    p.add_argument("--data-root", required=True, help="image folders with train/ and test/ (folder-lt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="steps: epochs of training measured")
    p.add_argument("--max-steps", type=int, default=0, help="steps: at most this many steps an epoch (0: all)")
    p.add_argument("--checkpoints", nargs="+", default=[], help="alpha: train.py checkpoints of exact runs")
    p.add_argument("--batches", type=int, default=20, help="alpha: fixed batches per checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results here as JSON")
    study = p.parse_args()
    torch.set_num_threads(study.threads)
    device = torch.device(study.device)
    t0 = time.time()
    if study.part == "alpha":
        res = alpha_study(study, device)
        return finish(study, res, {"data_root": study.data_root}, t0)
    data = data_lt.build_data("folder-lt", study.data_root, imb_factor=100, seed=0)
    if data.kind == "tensor":  # as train.main: CIFAR-sized images live on the device
        same = data.train_eval is data.train
        data.train, data.test = data.train.to(device), data.test.to(device)
        data.train_eval = data.train if same else data.train_eval.to(device)
    res = grouping_study(study, data, device) if study.part == "grouping" else steps_study(study, data, device)
    finish(study, res, {"data": f"folder-lt {study.data_root} IF 100, {len(data.train)} images, K={data.num_classes}"},
           t0)


def finish(study, res, setup, t0):
    res["setup"] = {**setup, "device": str(study.device), "threads": study.threads, "seconds": time.time() - t0,
                    "torch": torch.__version__}
    if study.out:
        os.makedirs(os.path.dirname(os.path.abspath(study.out)), exist_ok=True)
        with open(study.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
