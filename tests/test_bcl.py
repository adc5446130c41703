"""BCL as a base method (--loss bcl): the loss against a per-anchor loop written from the paper's
formula, the gradient bookkeeping under MGDA, per-sample seeded views, and train.py end to end
(both BCL alone and BCL+GBG+MOO) with an exact resume over three views."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_lt
import train as T

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def weights(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]


# --- the loss -------------------------------------------------------------------------------------

def bcl_reference(features, targets, prototypes, temperature):
    """Zhu et al. 2022, Eq. (BCL) written anchor by anchor, in float64 Python loops: for anchor i of
    class y, the candidates are every other view embedding and every class prototype; the
    denominator sums, over classes c, the MEAN of exp(z_i . z_k / t) over c's candidates; the loss
    averages -log(exp(z_i . z_p / t) / denominator) over the positives p (class y's candidates)."""
    f, p = features.double().tolist(), prototypes.double().tolist()
    y = targets.tolist()
    dot = lambda a, b: sum(u * v for u, v in zip(a, b))
    total = 0.0
    for i in range(len(f)):
        cands = [(f[k], y[k]) for k in range(len(f)) if k != i] + [(p[c], c) for c in range(len(p))]
        by_class = {}
        for vec, c in cands:
            by_class.setdefault(c, []).append(math.exp(dot(f[i], vec) / temperature))
        denominator = sum(sum(v) / len(v) for v in by_class.values())
        positives = [vec for vec, c in cands if c == y[i]]
        total += -sum(math.log(math.exp(dot(f[i], vec) / temperature) / denominator) for vec in positives) / len(positives)
    return total / len(f)


@pytest.mark.parametrize("seed", [0, 1])
def test_bcl_loss_matches_per_anchor_loop(seed):
    g = torch.Generator().manual_seed(seed)
    K, d = 6, 8
    # class 0 four samples, class 1 one (its only positive is its prototype), classes 4 and 5 absent
    # (prototypes only: class-complement), unequal counts everywhere (class-averaging matters)
    targets = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])
    features = F.normalize(torch.randn(len(targets), d, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(K, d, generator=g), dim=1)
    for temperature in (0.1, 0.5):
        got = T.bcl_loss(features, targets, prototypes, temperature).item()
        want = bcl_reference(features, targets, prototypes, temperature)
        assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    # the float64 path is exact to roundoff
    got = T.bcl_loss(features.double(), targets, prototypes.double(), 0.1).item()
    assert got == pytest.approx(bcl_reference(features, targets, prototypes, 0.1), abs=1e-10)


def test_bcl_loss_differs_from_summed_denominator():
    """Class-averaging is not a no-op: with a 5:1 class imbalance in the batch, averaging differs
    from SupCon's plain sum over candidates (checked against the loop with counts forced to 1)."""
    g = torch.Generator().manual_seed(3)
    targets = torch.tensor([0, 0, 0, 0, 0, 1])
    features = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(2, 4, generator=g), dim=1)
    ours = T.bcl_loss(features, targets, prototypes, 0.1).item()
    f, p = features.double(), prototypes.double()
    summed = 0.0
    for i in range(6):
        cand = torch.cat([f[torch.arange(6) != i], p])
        labels = torch.cat([targets[torch.arange(6) != i], torch.arange(2)])
        s = cand @ f[i] / 0.1
        summed += -(s[labels == targets[i]] - torch.logsumexp(s, 0)).mean().item()
    assert abs(ours - summed / 6) > 1e-3


def test_bcl_contrast_uses_heads_and_prototypes():
    torch.manual_seed(0)
    model = T.make_bcl_model(T.build_model("resnet8", 5), np.array([50, 20, 10, 5, 2]))
    assert (model.head[0].in_features, model.head[-1].out_features) == (64, 128)
    assert "log_prior" not in model.state_dict()  # rebuilt from the counts, not checkpointed
    assert torch.allclose(model.log_prior.exp().sum(), torch.tensor(1.0))
    z = torch.randn(12, 64)  # 3 views x 4 samples, the classification view first
    y = torch.tensor([0, 1, 1, 4])
    loss = T.bcl_contrast(model, z, y, 0.1)
    # the releases' structure: the head over all 3B rows (its BatchNorm1d in train mode sees them
    # all), then the first view's rows dropped
    emb = F.normalize(model.head(z), dim=1)[4:]
    protos = F.normalize(model.head_fc(model.fc.weight), dim=1)
    assert loss.item() == pytest.approx(bcl_reference(emb.detach(), y.repeat(2), protos.detach(), 0.1), abs=1e-5)
    loss.backward()  # the prototypes tie the classifier weights to the contrastive loss
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_head_batchnorm_sees_all_three_views():
    """One BCL training step (train.batch_losses, float64 ResNet-8): the contrastive head's
    BatchNorm1d normalises the 3B rows of the three views' features, as BCL's BCLModel.forward and
    the authors' CIFAR model do. Checked on its input (a forward hook) and on its running
    statistics from the known start (mean 0, var 1, momentum 0.1) against the batch statistics
    of head[0] applied to the backbone features of all three views, computed on a copy."""
    import copy
    torch.manual_seed(0)
    model = T.make_bcl_model(T.build_model("resnet8", 5), np.array([50, 20, 10, 5, 2])).double().train()
    g = torch.Generator().manual_seed(1)
    B = 6
    views = [torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 1, 1, 4, 2, 0])
    ref = copy.deepcopy(model)
    seen = []
    bn = model.head[1]
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    args = argparse.Namespace(loss="bcl", amp=False, bcl_weight=1.6, bcl_temp=0.1, world_size=1, bcl_group_loss="la")
    _, _, contrast, _ = T.batch_losses(model, views, y, torch.bincount(y, minlength=5), args, torch.device("cpu"))
    hook.remove()
    with torch.no_grad():
        z = ref.backbone(torch.cat(views))  # train mode: batch statistics, as in the step
        h = ref.head[0](z)
    assert len(seen) == 1 and seen[0].shape == (3 * B, 512)
    assert torch.allclose(seen[0], h, rtol=0, atol=1e-12)
    m = bn.momentum
    assert torch.allclose(bn.running_mean, m * h.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_var, (1 - m) + m * h.var(0, unbiased=True), rtol=0, atol=1e-12)
    # and the loss is BCL's on the contrastive views' rows of that head's output
    emb = F.normalize(ref.head(z), dim=1)[B:]
    protos = F.normalize(ref.head_fc(ref.fc.weight), dim=1)
    want = 1.6 * bcl_reference(emb.detach(), y.repeat(2), protos.detach(), 0.1)
    assert contrast.item() == pytest.approx(want, abs=1e-10)


def _excess_kurtosis(w):
    w = w.double().flatten()
    w = w - w.mean()
    return ((w ** 4).mean() / (w ** 2).mean() ** 2 - 3).item()


def test_heads_initialised_as_the_releases():
    """CIFAR-sized heads (ResNet-8/32, D = 64): Kaiming normal weights, std sqrt(2 / fan_in) (He et
    al. 2015, the default of torch.nn.init.kaiming_normal_ that the authors' CIFAR model applies to
    every Linear), Gaussian (excess kurtosis ~0, a uniform draw has -1.2); biases left at
    nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). ResNet-50-sized heads (D = 2048):
    nn.Linear's default for the weights too, as BCL's BCLModel. Tolerances: std within 3 % (the
    sample std of 32,768+ draws is off by ~0.4 %), kurtosis within 0.15 (its standard error is
    sqrt(24 / n) < 0.03)."""
    torch.manual_seed(0)
    model = T.make_bcl_model(T.build_model("resnet8", 5), np.array([50, 20, 10, 5, 2]))
    for head in (model.head, model.head_fc):
        for layer in (head[0], head[3]):
            fan_in = layer.in_features
            w, b = layer.weight.detach(), layer.bias.detach()
            assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
            assert abs(w.mean().item()) < 0.05 * math.sqrt(2 / fan_in)
            assert abs(_excess_kurtosis(w)) < 0.15
            bound = 1 / math.sqrt(fan_in)
            assert b.abs().max().item() <= bound and b.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    big = T.make_bcl_model(T.Net(torch.nn.Identity(), 2048, 5), np.array([50, 20, 10, 5, 2]))
    for head in (big.head, big.head_fc):
        for layer in (head[0], head[3]):
            bound = 1 / math.sqrt(layer.in_features)
            w = layer.weight.detach()
            assert w.abs().max().item() <= bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
            assert abs(_excess_kurtosis(w) + 1.2) < 0.15


# --- views ----------------------------------------------------------------------------------------

def _tiny_tensor_set(n=12, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return data_lt.TensorImages(images, torch.arange(n) % 3, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)


def test_views_depend_on_seed_and_index_only(tmp_path):
    ds = _tiny_tensor_set()
    views = data_lt.bcl_views("tensor", ds.mean, ds.std, (32, 32))
    a = data_lt.SeededViews(ds, views, seed=7)
    rng_before = torch.get_rng_state()
    first = [a[i][0] for i in range(len(ds))]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the trainer's RNG stream is untouched
    # another order, another object, draws in between: the same views
    torch.manual_seed(123)
    b = data_lt.SeededViews(ds, data_lt.bcl_views("tensor", ds.mean, ds.std, (32, 32)), seed=7)
    for i in reversed(range(len(ds))):
        assert all(torch.equal(u, v) for u, v in zip(b[i][0], first[i]))
    xs = first[0]
    assert len(xs) == 3 and all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in xs)
    assert not torch.equal(xs[1], xs[2])  # two contrastive views of one image differ
    c = data_lt.SeededViews(ds, views, seed=8)
    assert not all(torch.equal(u, v) for u, v in zip(c[0][0], first[0]))
    # the loader: batches of views, the same whatever the batching and the worker processes
    batches = [[0, 5, 2], [7, 1], [11, 3, 4, 6]]
    one = list(data_lt.make_loader(ds, batches, train=True, device="cpu", num_workers=0, seed=7, views=views))
    two = list(data_lt.make_loader(ds, batches, train=True, device="cpu", num_workers=2, seed=7, views=views))
    for (xs1, y1), (xs2, y2), idx in zip(one, two, batches):
        assert torch.equal(y1, ds.targets[idx]) and torch.equal(y1, y2)
        for v in range(3):
            assert torch.equal(xs1[v], xs2[v])
            assert torch.equal(xs1[v], torch.stack([first[i][v] for i in idx]))


def test_file_views_are_seeded_too(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(p)
        paths.append((p.name, i))
    ds = data_lt.ImageList(str(tmp_path), None, 3, samples=paths)
    views = data_lt.bcl_views("files", data_lt.IMAGENET_MEAN, data_lt.IMAGENET_STD, 48)
    a, b = data_lt.SeededViews(ds, views, seed=1), data_lt.SeededViews(ds, views, seed=1)
    xa, ya = a[2]
    xb, yb = b[2]
    assert ya == yb == 2 and all(x.shape == (3, 48, 48) for x in xa)
    assert all(torch.equal(u, v) for u, v in zip(xa, xb))


def _transforms(pipeline, kind):
    found = []
    for t in getattr(pipeline, "transforms", []):
        if isinstance(t, kind):
            found.append(t)
        found += _transforms(t, kind)
    return found


def test_view_recipes_match_the_releases():
    """Contrastive crops of CIFAR-sized images keep (0.2, 1) of the area, as the authors' CIFAR
    script; ImageNet-LT / iNat's RandAugment is timm's rand-n2-m10 as BCL uses it: 2 ops, each
    applied with p 0.5, at magnitude 10 of 10 (full strength; torchvision's default 31 bins would
    make 10 a third of it)."""
    from torchvision.transforms import v2
    _, sim, _ = data_lt.bcl_views("tensor", data_lt.CIFAR_MEAN, data_lt.CIFAR_STD, (32, 32))
    crops = _transforms(sim, v2.RandomResizedCrop)
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.2, 1.0)
    cls, sim, _ = data_lt.bcl_views("files", data_lt.IMAGENET_MEAN, data_lt.IMAGENET_STD, 224)
    applies = [t for t in _transforms(cls, v2.RandomApply) if _transforms(t, v2.RandAugment)]
    assert len(applies) == 2 and all(t.p == 0.5 for t in applies)
    for t in applies:
        (ra,) = _transforms(t, v2.RandAugment)
        assert ra.num_ops == 1 and ra.magnitude == ra.num_magnitude_bins - 1 == 10
        # full strength: the largest rotation is 30 degrees, timm's at magnitude 10
        rotate = ra._AUGMENTATION_SPACE["Rotate"][0](ra.num_magnitude_bins, 224, 224)  # private, torchvision 0.2x
        assert float(rotate[ra.magnitude]) == 30.0
    assert not _transforms(sim, v2.RandAugment)


def test_bcl_group_losses_are_plain_or_logit_adjusted(monkeypatch, tmp_path):
    """--bcl-group-loss ce gives the group losses the cosine classifier's own logits (the authors'
    CIFAR script); la (the default) the logit-adjusted ones, logits + log prior. Checked on the
    first training step of BCL+GBG, in this process."""
    import gbg
    import train as T
    seen = {}

    class Stop(Exception):
        pass

    forward = T.CosineClassifier.forward

    def recording_forward(self, z):
        seen["plain"] = out = forward(self, z)
        return out

    def recording_group_losses(logits, *a, **k):
        seen["given"] = logits
        raise Stop
    monkeypatch.setattr(T.CosineClassifier, "forward", recording_forward)
    monkeypatch.setattr(gbg, "group_losses", recording_group_losses)
    counts = torch.tensor([int(200 * 100 ** (-k / 9)) for k in range(10)], dtype=torch.float32)  # synthetic-lt
    for mode in ("ce", "la"):
        args = T.get_args_parser().parse_args(["--dataset", "synthetic-lt", "--batch-size", "64", "--epochs", "1",
                                               "--grouping", "count", "--bcl-group-loss", mode, *FAST,
                                               "--output-dir", str(tmp_path / mode)])
        seen.clear()
        with pytest.raises(Stop):
            T.main(args)
        plain = seen["plain"].detach().float()
        shift = (counts / counts.sum()).log() if mode == "la" else torch.zeros(10)
        assert plain.shape == seen["given"].shape
        assert torch.allclose(seen["given"].detach(), plain + shift, atol=1e-5), mode


# --- train.py -------------------------------------------------------------------------------------

def _write_folder(root, classes=4, per_class=(12, 6, 4, 2), n_test=2, size=32):
    """A tiny ImageFolder tree root/{train,test}/<class>/*.png: class k a noisy colour."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, counts in (("train", per_class), ("test", [n_test] * classes)):
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(counts[k]):
                base = np.array([60 * k, 255 - 60 * k, 128], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


FAST = ["--arch", "resnet8", "--device", "cpu", "--workers", "0", "--print-freq", "1000", "--loss", "bcl"]
ALONE = ["--grouping", "none", "--moo", "none", "--sampler", "random"]
WITH_GBG = ["--moo", "mgda", "--sampler", "gac"]


def test_folder_lt_resume_is_exact_with_three_views(tmp_path):
    root = tmp_path / "folder"
    _write_folder(root)
    args = ["--dataset", "folder-lt", "--data-root", str(root), "--imb-factor", "1", "--batch-size", "8",
            "--epochs", "2", "--num-groups", "2", *FAST, *WITH_GBG]
    ref = run_train(*args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = run_train(*args, "--output-dir", str(tmp_path / "cut"), "--exit-after-epoch", "0")
    assert cut.returncode == 0, cut.stderr[-3000:]
    again = run_train(*args, "--output-dir", str(tmp_path / "cut"))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert any(k.startswith("head_fc.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in open(tmp_path / "ref" / "log.txt")]
    assert all(math.isfinite(e["train_bcl_loss"]) and e["alpha_mean"] for e in log)
    alone = run_train(*args[:-len(WITH_GBG)], *ALONE, "--epochs", "1", "--output-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "bcl: 2.0 * logit-adjusted CE + 1.6 * BCL (temperature 0.1)" in alone.stdout


def test_synthetic_lt_runs_bcl_alone(tmp_path):
    """BCL without GBG on synthetic-lt (BCL+GBG+MOO runs there in the two-process test below)."""
    r = run_train("--dataset", "synthetic-lt", "--batch-size", "128", "--epochs", "1", *FAST, *ALONE,
                  "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads(open(tmp_path / "log.txt").readline())
    assert math.isfinite(log["train_loss"]) and math.isfinite(log["train_bcl_loss"]) and "alpha_mean" not in log


# --- distributed ----------------------------------------------------------------------------------

WRAPPER = """
import argparse, sys
import torch, torch.nn as nn
sys.path.insert(0, {root!r})
import train


def small_model(arch, num_classes):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return train.Net(backbone, 16, num_classes)


_epoch = train.train_one_epoch


def epoch_and_save(model, loader, optimizer, epoch, args, *rest):
    stats = _epoch(model, loader, optimizer, epoch, args, *rest)
    torch.save(model.state_dict(), f"{{args.output_dir}}/rank{{args.rank}}-epoch{{epoch}}.pth")
    return stats


train.build_model, train.train_one_epoch = small_model, epoch_and_save
train.main(argparse.ArgumentParser(parents=[train.get_args_parser()]).parse_args())
"""


def test_two_processes_apply_the_same_bcl_update(tmp_path):
    """Each process has its own contrastive loss (its own views), so only the all-reduce of the
    BCL gradient keeps the processes' weights identical: without it, they drift apart at once.
    Checked after BCL+GBG+MOO training (synthetic-lt, GAC, 2 gloo processes, a small conv net),
    every weight bit for bit."""
    wrapper = tmp_path / "small.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "--dataset", "synthetic-lt", "--device", "cpu", "--batch-size", "64", "--epochs", "1", "--sync-bn",
           "--loss", "bcl", "--moo", "mgda", "--sampler", "gac", "--workers", "0", "--print-freq", "1000",
           "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    w0 = torch.load(out / "rank0-epoch0.pth", map_location="cpu")
    w1 = torch.load(out / "rank1-epoch0.pth", map_location="cpu")
    heads = [k for k in w0 if k.startswith(("head.", "head_fc.")) and "running" not in k and "num_batches" not in k]
    assert heads  # the contrastive branch alone decides these weights
    for k in w0:
        if k.startswith(("head.", "head_fc.")) and ("running" in k or "num_batches" in k):
            continue  # per process during an epoch (train.py averages them after it; see test_distributed)
        assert torch.equal(w0[k], w1[k]), k
    log = json.loads(open(out / "log.txt").readline())
    assert math.isfinite(log["train_bcl_loss"]) and log["alpha_mean"]
