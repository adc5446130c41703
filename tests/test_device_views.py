"""BCL's views made on the device (data_lt.device_views) against torchvision's per-image transforms
(bcl_views("tensor", ...), run per sample in workers): the counter-based draws against a pure-Python
SplitMix64, their distributions against torchvision's own draws, each view against torchvision's
functional ops applied with the same drawn parameters, their independence of batching, and a
resumed BCL run against an uninterrupted one."""
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import data_lt

F = v2.functional
M64 = (1 << 64) - 1


def images(n, seed=0, size=32):
    """Half noise, half smooth colour fields (so that crops, jitter and equalize see both)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    smooth = torch.randint(0, 256, (n // 2, 3, 4, 4), generator=g).float()
    x[:n // 2] = torch.nn.functional.interpolate(smooth, size=size, mode="bilinear").round().to(torch.uint8)
    return x


# --- the draws ------------------------------------------------------------------------------------

def splitmix64_ref(z):
    """SplitMix64's output function (Steele et al. 2014) on Python integers mod 2^64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_draws_are_splitmix64_of_seed_view_index_and_counter():
    golden = 0x9E3779B97F4A7C15
    index = torch.tensor([0, 1, 5, 12345, 2 ** 40 + 3])
    for seed in (0, 7, -3, 2 ** 62 + 11):
        for view in (0, 2):
            u = data_lt.view_uniforms(seed, view, index, 5)
            for row, i in enumerate(index.tolist()):
                key = splitmix64_ref((seed + golden * (view + 1)) & M64)
                key = splitmix64_ref((key + i * golden) & M64)
                for k in range(5):
                    want = (splitmix64_ref((key + (k + 1) * golden) & M64) >> 11) * 2.0 ** -53
                    assert u[row, k].item() == want, (seed, view, i, k)
    u = data_lt.view_uniforms(1, 0, torch.arange(20000), 4)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005  # sd of the mean: 0.001


def test_views_depend_on_seed_and_index_only():
    x, idx = images(24), torch.arange(24)
    rng = torch.get_rng_state()
    whole = data_lt.device_views(x, idx, 11, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    assert torch.equal(torch.get_rng_state(), rng)  # the trainer's RNG stream is untouched
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    shuffled = data_lt.device_views(x[perm], perm, 11, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    part = data_lt.device_views(x[5:9], idx[5:9], 11, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    for v in range(3):
        assert whole[v].shape == (24, 3, 32, 32) and whole[v].dtype == torch.float32
        assert torch.equal(shuffled[v], whole[v][perm]) and torch.equal(part[v], whole[v][5:9])
    assert not torch.equal(whole[1], whole[2])  # the two contrastive views differ
    other = data_lt.device_views(x, idx, 12, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    assert all(not torch.equal(a[i], b[i]) for a, b in zip(whole, other) for i in range(24))
    # the same image under another index gets other views: the draws follow the index
    moved = data_lt.device_views(x[:4], idx[:4] + 100, 11, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    assert not torch.equal(moved[1], whole[1][:4])
    # the loader: the same views whatever the batching; labels follow the indices
    ds = data_lt.TensorImages(x, torch.arange(24) % 5, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    batches = [[0, 5, 2], [7, 1], [11, 3, 4, 6, 23]]
    for (xs, y), b in zip(data_lt.make_loader(ds, batches, train=True, device="cpu", seed=11, views="device"), batches):
        assert torch.equal(y, ds.targets[b]) and all(torch.equal(xs[v], whole[v][b]) for v in range(3))
    with pytest.raises(data_lt.UserError, match="views='device'"):
        data_lt.make_loader(ds, batches, train=True, device="cpu", views="gpu")


# --- statistics against torchvision's draws --------------------------------------------------------

def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic of two 1-D samples."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def test_contrastive_draws_follow_torchvision():
    n, H = 20000, 32
    p = data_lt.sim_view_params(4, 1, torch.arange(n), H, H)
    cls_v, sim_v = data_lt.bcl_views("tensor", data_lt.CIFAR_MEAN, data_lt.CIFAR_STD, (H, H))[:2]
    rrc, flip, jitter, gray = sim_v.transforms[:4]
    assert rrc.scale == data_lt.CONTRAST_SCALE and tuple(rrc.ratio) == (3 / 4, 4 / 3)
    torch.manual_seed(0)
    img = torch.zeros(3, H, H, dtype=torch.uint8)
    tv = [rrc.make_params([img]) for _ in range(n)]
    th, tw = np.array([t["height"] for t in tv]), np.array([t["width"] for t in tv])
    tt, tl = np.array([t["top"] for t in tv]), np.array([t["left"] for t in tv])
    h, w, top, left = (p[k].numpy() for k in ("h", "w", "top", "left"))
    # KS critical value at level 1e-3 for two samples of n: 1.95 * sqrt(2 / n) = 0.0195 (discrete
    # data make the test conservative)
    crit = 1.95 * math.sqrt(2 / n)
    assert ks_distance(h * w, th * tw) < crit                      # crop areas
    assert ks_distance(w / h, tw / th) < crit                      # aspect ratios
    assert ks_distance(h, th) < crit and ks_distance(w, tw) < crit  # sides
    # the position: uniform over the allowed offsets, as torch.randint
    assert ks_distance(top / (H - h + 1), tt / (H - th + 1)) < crit
    assert ks_distance(left / (H - w + 1), tl / (H - tw + 1)) < crit
    assert ((h <= H) & (w <= H) & (top + h <= H) & (left + w <= H) & (h > 0) & (w > 0)).all()
    # rates: 4.5 binomial standard deviations of n draws
    for drawn, rate in ((p["flip"], flip.p), (p["jitter"], jitter.p), (p["gray"], gray.p)):
        assert abs(drawn.double().mean().item() - rate) < 4.5 * math.sqrt(rate * (1 - rate) / n), rate
    cj = jitter.transforms[0]
    for k, (lo, hi) in enumerate([cj.brightness, cj.contrast, cj.saturation, cj.hue]):
        f = p["factors"][:, k].double()
        sd_of_mean = (hi - lo) / math.sqrt(12 * n)
        assert lo <= f.min() and f.max() <= hi and abs(f.mean().item() - (lo + hi) / 2) < 4.5 * sd_of_mean
    # the jitter order: every one of the 24 orders equally often (chi-square, 23 dof, level ~1e-4: 55)
    counts = Counter(tuple(o) for o in p["order"].tolist())
    assert len(counts) == 24 and sum((c - n / 24) ** 2 / (n / 24) for c in counts.values()) < 55
    # the classification view's crop offsets, flip and Cutout centre
    q = data_lt.cls_view_params(4, torch.arange(n), H, H)
    for k, m in (("dy", 2 * data_lt.PAD + 1), ("dx", 2 * data_lt.PAD + 1), ("cy", H), ("cx", H)):
        c = np.bincount(q[k].numpy(), minlength=m)
        assert len(c) == m and ((c - n / m) ** 2 / (n / m)).sum() < 3 * m + 20, k
    assert abs(q["flip"].double().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / n)


def test_autoaugment_table_and_frequencies_follow_torchvision(monkeypatch):
    aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    assert data_lt.AA_CIFAR10 == aa._policies
    H = 32
    for sub in aa._policies:
        for op, _, b in sub:
            fn, signed = aa._AUGMENTATION_SPACE[op]
            mags = fn(10, H, H)
            want = (0.0, False) if mags is None else (float(mags[b]), signed)
            assert (data_lt.aa_magnitude(op, b, H, H) if b is not None else (0.0, False)) == want, op
    # what torchvision's AutoAugment applies, recorded per image, against what the device view applies
    n = 20000
    seen = []
    monkeypatch.setattr(aa, "_apply_image_or_video_transform",
                        lambda img, op, m, **kw: seen.append((op, round(m, 6))) or img)
    torch.manual_seed(0)
    img = torch.zeros(3, H, H, dtype=torch.uint8)
    for _ in range(n):
        aa(img)
    p = data_lt.cls_view_params(9, torch.arange(n), H, H)
    mine = []
    for i in range(n):
        sub = data_lt.AA_CIFAR10[int(p["policy"][i])]
        for stage, (op, prob, b) in enumerate(sub):
            if p["apply"][i, stage] <= prob:
                m, signed = data_lt.aa_magnitude(op, b, H, H) if b is not None else (0.0, False)
                mine.append((op, round(-m if signed and p["negate"][i, stage] else m, 6)))
    a, b = Counter(mine), Counter(seen)
    assert set(a) == set(b)
    for key in a:  # the difference of two Poisson-like counts: sd sqrt(a + b)
        assert abs(a[key] - b[key]) <= 4.5 * math.sqrt(a[key] + b[key]) + 1, (key, a[key], b[key])
    policies = np.bincount(p["policy"].numpy(), minlength=25)
    assert ((policies - n / 25) ** 2 / (n / 25)).sum() < 75  # chi-square, 24 dof


# --- each view against torchvision's ops with the same draws ---------------------------------------

def tv_cls_view(img, p, i, mean, std):
    """The classification view of one image by torchvision's own ops and AutoAugment's own op code."""
    aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    H, W = img.shape[-2:]
    x = F.crop(F.pad(img, [data_lt.PAD] * 4), int(p["dy"][i]), int(p["dx"][i]), H, W)
    x = F.hflip(x) if p["flip"][i] else x
    for stage, (op, prob, b) in enumerate(aa._policies[int(p["policy"][i])]):
        if p["apply"][i, stage] <= prob:
            fn, signed = aa._AUGMENTATION_SPACE[op]
            mags = fn(10, H, W)
            m = 0.0 if mags is None else float(mags[b])
            m = -m if signed and p["negate"][i, stage] else m
            x = aa._apply_image_or_video_transform(x, op, m, interpolation=aa.interpolation, fill=aa._fill)
    x = F.normalize(F.to_dtype(x, torch.float32, scale=True), mean, std)
    cy, cx, half = int(p["cy"][i]), int(p["cx"][i]), data_lt.CUTOUT // 2
    x[:, max(cy - half, 0):cy + half, max(cx - half, 0):cx + half] = 0
    return x


def test_classification_view_equals_torchvision_ops():
    n, seed = 300, 21
    x, idx = images(n), torch.arange(n)
    mean, std = data_lt.CIFAR_MEAN, data_lt.CIFAR_STD
    p = data_lt.cls_view_params(seed, idx, 32, 32)
    mine = data_lt.device_views(x, idx, seed, mean, std)[0]
    for i in range(n):
        assert torch.equal(mine[i], tv_cls_view(x[i], p, i, mean, std)), i


def test_contrastive_view_equals_torchvision_ops():
    """Exact, given the crop: torchvision's CPU resize of uint8 images rounds in fixed point and
    differs by one level of 255 on some pixels; its float path (used on CUDA) is matched exactly."""
    n, seed = 300, 22
    x, idx = images(n), torch.arange(n)
    mean, std = data_lt.CIFAR_MEAN, data_lt.CIFAR_STD
    p = data_lt.sim_view_params(seed, 2, idx, 32, 32)
    box = lambda i: (int(p["top"][i]), int(p["left"][i]), int(p["h"][i]), int(p["w"][i]))
    flip = lambda i, t: F.hflip(t) if p["flip"][i] else t
    crops = data_lt.resized_crop(x, p["top"], p["left"], p["h"], p["w"], p["flip"], (32, 32))
    for i in range(n):  # the crop against torchvision's float resize, which it matches exactly
        ref = flip(i, F.resized_crop(x[i].float(), *box(i), [32, 32], antialias=True)).round()
        assert torch.equal(crops[i].float(), ref), i
    uint8_ref = torch.stack([flip(i, F.resized_crop(x[i], *box(i), [32, 32], antialias=True)) for i in range(n)])
    assert (crops.int() - uint8_ref.int()).abs().max() <= 1
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for k, op in enumerate(ops):  # each jitter op on the same input
        f = p["factors"][:, k]
        ref = torch.stack([op(crops[i], float(f[i])) for i in range(n)])
        assert torch.equal(data_lt.jitter_op(crops, k, f), ref), k
    # the whole view: torchvision's ops in each sample's drawn order, from the same crop
    views = data_lt.sim_view(x, p, mean, std)
    for i in range(n):
        t = crops[i]
        if p["jitter"][i]:
            for k in p["order"][i].tolist():
                t = ops[k](t, float(p["factors"][i, k]))
        t = F.rgb_to_grayscale(t, 3) if p["gray"][i] else t
        ref = F.normalize(F.to_dtype(t, torch.float32, scale=True), mean, std)
        assert torch.equal(views[i], ref), i
    # grayscale where drawn, seen in the output: the three channels are one uint8 image
    pixels = (views * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).mul(255).round()
    is_gray = (pixels[:, 0] == pixels[:, 1]).all(2).all(1) & (pixels[:, 1] == pixels[:, 2]).all(2).all(1)
    assert torch.equal(is_gray, p["gray"]) and 0 < is_gray.sum() < n


# --- train.py --------------------------------------------------------------------------------------

FAST = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--workers", "0", "--print-freq",
        "1000", "--loss", "bcl", "--grouping", "none", "--moo", "none", "--sampler", "random", "--batch-size", "128"]


def run_train(*argv):
    """train.py's main in this process (no interpreter start-up per run); returns what it printed."""
    import argparse
    import contextlib
    import io
    import train as T
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(list(argv)))
    return out.getvalue()


def test_resume_with_device_views_is_exact(tmp_path):
    ref = run_train(*FAST, "--epochs", "2", "--output-dir", str(tmp_path / "ref"))  # device views by default
    assert "views made on the device" in ref
    cut = [*FAST, "--epochs", "2", "--views", "device", "--output-dir", str(tmp_path / "cut")]
    run_train(*cut, "--exit-after-epoch", "0")
    assert "resumed from" in run_train(*cut)
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
            for d in ("ref", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.txt")] for d in ("ref", "cut")]
    assert [e["train_bcl_loss"] for e in logs[0]] == [e["train_bcl_loss"] for e in logs[1]]
    # a run keeps its views when resumed without --views; a run from before --views made them in workers
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["args"]["views"] == "device"
    del ckpt["args"]["views"]
    ckpt["args"]["epochs"] = 3  # a 3-epoch run of that time, stopped after epoch 1
    torch.save(ckpt, tmp_path / "cut" / "checkpoint.pth")
    older = run_train(*FAST, "--epochs", "3", "--output-dir", str(tmp_path / "cut"))
    assert "views made in DataLoader workers" in older


def test_views_flag_picks_where_views_are_made():
    import argparse
    import train as T
    tensor = data_lt.build_data("synthetic-lt", None, imb_factor=10)
    files = argparse.Namespace(kind="files", mean=data_lt.IMAGENET_MEAN, std=data_lt.IMAGENET_STD)
    pick = lambda data, views: T.bcl_train_views(data, argparse.Namespace(views=views, dataset="imagenet-lt"))
    assert pick(tensor, None) == "device" and pick(tensor, "device") == "device"
    for data, views in ((tensor, "workers"), (files, None), (files, "workers")):
        made = pick(data, views)
        assert isinstance(made, list) and len(made) == 3 and all(isinstance(t, v2.Compose) for t in made)
    with pytest.raises(data_lt.UserError, match="use --views workers"):
        pick(files, "device")
