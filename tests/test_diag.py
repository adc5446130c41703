"""--diag-every, the paper's Fig. 2 measure: gbg.class_update_cosines against per-sample autograd,
train.py's diagnostic against separate per-class backward passes on the run's own checkpoint, and a
run with the diagnostic trains exactly as one without it."""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data_lt  # noqa: E402
import gbg  # noqa: E402
import train as T  # noqa: E402
from test_train import TINY, train, weights  # noqa: E402


def test_class_update_cosines_match_per_sample_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    params = list(net.parameters())
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 3, 0, 1, 3, 3, 0, 1, 0, 3])  # class 2 absent
    d = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)

    def grad_of(i):  # one sample's gradient, its own forward and backward
        g = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
        return torch.cat([t.reshape(-1) for t in g])

    per_sample = torch.stack([grad_of(i) for i in range(len(y))])
    for scale in (1, 3):  # the batch as one process's share of a global batch with `scale` x the counts
        counts = torch.bincount(y, minlength=4) * scale
        cos, ratio = gbg.class_update_cosines(net(x), y, d, params, class_counts=None if scale == 1 else counts)
        for k in range(4):
            if (y == k).sum() == 0:
                assert math.isnan(cos[k]) and math.isnan(ratio[k])
                continue
            g = per_sample[y == k].sum(0) / counts[k]
            assert cos[k].item() == pytest.approx((g @ d / (g.norm() * d.norm())).item(), abs=1e-12)
            assert ratio[k].item() == pytest.approx((g.norm() / d.norm()).item(), rel=1e-12)


def _log(path):
    return [json.loads(line) for line in open(path / "log.txt")]


def test_diagnostic_changes_nothing_in_the_training(tmp_path):
    """GBG+MOO with GAC, grouping at epoch 0 (two epochs, shorter than the warm-up): with and
    without the diagnostic after every epoch, the same losses, accuracies and weights."""
    on, off = tmp_path / "on", tmp_path / "off"
    for out, extra in ((on, ["--diag-every", "1", "--diag-batches", "2"]), (off, [])):
        r = train(*TINY, "--epochs", "2", "--output-dir", str(out), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _log(on), _log(off)
    for ea, eb in zip(a, b):
        for k, v in eb.items():
            if not k.endswith("time_s") and k != "images_per_s":
                assert ea[k] == v, k
        assert len(ea["diag_cos"]) == 10 and ea["diag_time_s"] > 0
        assert all(c is None or -1 <= c <= 1 for c in ea["diag_cos"])
        assert ea["diag_cos_many"] is not None
    wa, wb = weights(on), weights(off)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_diagnostic_of_a_ce_run_against_separate_backward_passes(tmp_path):
    r = train(*TINY, "--epochs", "1", "--grouping", "none", "--moo", "none", "--diag-every", "1",
              "--diag-batches", "2", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = _log(tmp_path)[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    args = argparse.Namespace(**ckpt["args"])
    data = data_lt.build_data(args.dataset, args.data_root, imb_factor=args.imb_factor, seed=args.data_seed)
    model = T.build_model(args.arch, data.num_classes)
    model.load_state_dict(ckpt["model"])
    model.train()
    params = T.moo_parameters(model)
    K = data.num_classes
    cos_sum, seen = np.zeros(K), np.zeros(K)

    def grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    for x, y in T.diag_loader(data, None, args, torch.device("cpu")):
        d = grad(F.cross_entropy(model(x), y))  # CE: the update is the batch's mean-loss gradient
        for k in torch.unique(y).tolist():
            g = grad(F.cross_entropy(model(x)[y == k], y[y == k]))  # a fresh forward for each class
            cos_sum[k] += (g @ d / (g.norm() * d.norm())).item()
            seen[k] += 1
    for k in range(K):
        if seen[k] == 0:
            assert logged["diag_cos"][k] is None
        else:
            assert logged["diag_cos"][k] == pytest.approx(cos_sum[k] / seen[k], abs=2e-5)
    many = data_lt.shot_masks(data.class_counts)["many"] & (seen > 0)
    assert logged["diag_cos_many"] == pytest.approx((cos_sum[many] / seen[many]).mean(), abs=2e-5)


def test_diagnostic_refuses_bcl(tmp_path):
    r = train(*TINY, "--epochs", "1", "--loss", "bcl", "--diag-every", "1", "--output-dir", str(tmp_path))
    assert r.returncode != 0 and "--diag-every" in r.stderr and "Traceback" not in r.stderr
