"""Pins on train.py end to end (synthetic-lt, CPU): model selection on val, --group-epoch and
--regroup-every, --grouping random, the log after a kill between the log write and the checkpoint
write, and BCL's training step (one and two processes) against a direct float64 computation."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_lt
import gbg
import train as T

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--batch-size", "128",
        "--print-freq", "1000", "--workers", "0"]
PLAIN = ["--grouping", "none", "--moo", "none", "--sampler", "random"]


def train(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.txt")]


def weights(out):
    return torch.load(Path(out) / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]


def group_epochs(stdout):
    return [int(e) for e in re.findall(r"groups \(epoch (\d+)\)", stdout)]


# ----------------------------------------------------------------------------- model selection

def script_val_and_test(monkeypatch, val_top1, test_top1, shots=(1.0, 2.0, 3.0)):
    """A val split (37 test images) added to the data, and evaluate replaced by scripted accuracies:
    the n-th evaluation of a split gives its n-th top-1, Many/Medium/Few top-1 + shots. Returns
    the count of evaluations per split."""
    build = data_lt.build_data

    def with_val(*a, **kw):
        data = build(*a, **kw)
        t = data.test
        data.val = data_lt.TensorImages(t.images[:37], t.targets[:37], t.mean, t.std)
        return data

    calls = {"val": 0, "test": 0}

    def scripted(model, loader, class_counts, device, args):
        split = "val" if sum(len(y) for _, y in loader) == 37 else "test"
        top1 = (val_top1 if split == "val" else test_top1)[calls[split]]
        calls[split] += 1
        return {"top1": top1, "many": top1 + shots[0], "medium": top1 + shots[1], "few": top1 + shots[2]}

    monkeypatch.setattr(data_lt, "build_data", with_val)
    monkeypatch.setattr(T, "evaluate", scripted)
    return calls


def test_best_on_val_is_the_val_argmax_not_the_test_one(tmp_path, monkeypatch):
    """A val split whose accuracy peaks at another epoch than the test accuracy: results.json's
    best_on_val must be the val argmax (epoch 1), with that epoch's test numbers, never the best
    test epoch (2). The accuracies are scripted (evaluate is replaced); the run is real."""
    val_top1, test_top1 = [10.0, 40.0, 20.0, 30.0], [50.0, 10.0, 60.0, 5.0]
    calls = script_val_and_test(monkeypatch, val_top1, test_top1)
    args = argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(
        [*FAST, *PLAIN, "--batch-size", "512", "--epochs", "4", "--output-dir", str(tmp_path)])
    T.main(args)
    assert calls == {"val": 4, "test": 4}
    results = json.load(open(tmp_path / "results.json"))
    best = results["best_on_val"]
    assert best["epoch"] == 1
    assert (best["val_top1"], best["test_top1"], best["test_few"]) == (40.0, 10.0, 13.0)
    assert results["last"]["top1"] == 5.0
    assert [e["val_top1"] for e in read_log(tmp_path)] == val_top1


def test_resume_keeps_best_on_val(tmp_path, monkeypatch):
    """The same scripted val and test accuracies (val peaks at epoch 1), the run stopped after epoch 1
    and resumed: best_on_val is still epoch 1 with its test numbers, not the best of the resumed
    epochs (3, val 30 > 20)."""
    calls = script_val_and_test(monkeypatch, [10.0, 40.0, 20.0, 30.0], [50.0, 10.0, 60.0, 5.0])
    argv = [*FAST, *PLAIN, "--batch-size", "512", "--epochs", "4", "--output-dir", str(tmp_path)]
    parser = argparse.ArgumentParser(parents=[T.get_args_parser()])
    assert T.main(parser.parse_args(argv + ["--exit-after-epoch", "1"])) is None
    results = T.main(parser.parse_args(argv))
    assert calls == {"val": 4, "test": 4}
    assert results["best_on_val"]["epoch"] == 1 and results["best_on_val"]["test_top1"] == 10.0
    assert json.load(open(tmp_path / "results.json"))["best_on_val"] == results["best_on_val"]


# ----------------------------------------------------------------------------- the loop's bookkeeping

def test_lr_batches_augmentations_and_sgd_steps_as_main_runs_them(tmp_path, monkeypatch):
    """One CE run of 3 epochs (lr 0.1, 1 warm-up epoch, then cosine; 492 images in batches of 128:
    4 steps an epoch), watched step by step as main runs it:
    - the lr of each step, by hand: 0.1 (t + 0.001) over the warm-up, t = epoch + step / 4, then
      0.05 (1 + cos(pi (t - 1) / 2)) down to its last step;
    - the batches: each epoch every sample once, in a new order; and the augmented images, sample
      by sample: new crops and flips every epoch;
    - every optimizer step against SGD written out: weight decay 5e-4 on every parameter
      (convolutions, BatchNorm, the classifier's weight and bias), momentum 0.9, no dampening,
      no Nesterov."""
    batches, images, lrs, checked = [], [], [], []
    real_sampler, real_losses, real_step = T.make_sampler, T.step_losses, torch.optim.SGD.step

    class Watched:  # the run's own sampler; its batches noted as the loader reads them
        def __init__(self, sampler):
            self.sampler = sampler

        def set_epoch(self, epoch):
            self.sampler.set_epoch(epoch)
            batches.append([])

        def __len__(self):
            return len(self.sampler)

        def __iter__(self):
            for b in self.sampler:
                batches[-1].append(list(b))
                yield b

    def step_losses(model, x, y, *a, **kw):
        images.append(x.detach().clone())
        return real_losses(model, x, y, *a, **kw)

    def sgd_step(self, *a, **kw):
        lr, wd, momentum = 0.1, 5e-4, 0.9
        lrs.append([g["lr"] for g in self.param_groups])
        want = []
        for g in self.param_groups:
            for p in g["params"]:
                d = p.grad.add(p, alpha=wd)
                buf = self.state[p].get("momentum_buffer")
                buf = d.clone() if buf is None else buf.mul(momentum).add(d)
                want.append((p, p.detach().add(buf, alpha=-lrs[-1][0]), buf))
        out = real_step(self, *a, **kw)
        for p, value, buf in want:
            assert torch.equal(p.detach(), value) and torch.equal(self.state[p]["momentum_buffer"], buf), p.shape
        checked.append(len(want))
        return out

    monkeypatch.setattr(T, "make_sampler", lambda *a, **kw: Watched(real_sampler(*a, **kw)))
    monkeypatch.setattr(T, "step_losses", step_losses)
    monkeypatch.setattr(torch.optim.SGD, "step", sgd_step)
    args = argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(
        [*FAST, *PLAIN, "--epochs", "3", "--warmup-epochs", "1", "--schedule", "cosine", "--output-dir", str(tmp_path)])
    T.main(args)
    model = T.build_model("resnet8", 10)
    assert checked == [len(list(model.parameters()))] * 12  # every parameter, at every step
    t = [e + s / 4 for e in range(3) for s in range(4)]
    hand = [0.1 * (x + 1e-3) if x < 1 else 0.05 * (1 + np.cos(np.pi * (x - 1) / 2)) for x in t]
    assert [l[0] for l in lrs] == pytest.approx(hand, rel=1e-12, abs=0) and all(len(set(l)) == 1 for l in lrs)
    assert hand[-1] == pytest.approx(0.0038060, rel=1e-4)  # the last step's, near the end of the cosine
    # batches: each epoch a permutation of the 492 samples, a different one every epoch
    assert [len(b) for b in batches] == [4, 4, 4]
    order = [sum(b, []) for b in batches]
    assert all(sorted(o) == list(range(492)) for o in order)
    assert order[0] != order[1] != order[2] != order[0]
    # augmentations: the image of a sample in one epoch against the next (pad-4 crop and flip: the
    # same draw 1 time in 162)
    seen = [{} for _ in range(3)]
    for step, x in enumerate(images):
        for row, i in enumerate(batches[step // 4][step % 4]):
            seen[step // 4][i] = x[row]
    for e in (0, 1):
        same = sum(torch.equal(seen[e][i], seen[e + 1][i]) for i in range(492))
        assert same < 25, (e, same)


# ----------------------------------------------------------------------------- grouping schedule

def reference_groups(checkpoint_dir, num_groups):
    """NCut groups of the checkpointed model, computed here from gbg's public functions: exact
    class gradients of the backbone over the training set, cosine affinity, NCut with seed 0."""
    data = data_lt.build_data("synthetic-lt", "./data", imb_factor=100, seed=0)
    model = T.build_model("resnet8", data.num_classes)
    model.load_state_dict(weights(checkpoint_dir))
    grads = gbg.class_gradients(model, data.train_eval, data.num_classes, list(model.backbone.parameters()),
                                recalibrate_bn=True)  # train.py's default
    groups = gbg.ncut_groups(gbg.affinity(grads), num_groups, seed=0)
    return [np.flatnonzero(groups == g).tolist() for g in range(num_groups)]


def test_group_epoch_and_regroup_every_end_to_end(tmp_path):
    """--group-epoch 1 --regroup-every 2 over 4 epochs: epoch 0 is plain CE (no groups, no MGDA),
    groups are made at epochs 1 and 3, each from the model trained so far (checked against the
    NCut of the checkpoint written just before epoch 3, taken through a stop and resume)."""
    args = [*FAST, "--group-epoch", "1", "--regroup-every", "2", "--epochs", "4", "--output-dir", str(tmp_path)]
    first = train(*args, "--exit-after-epoch", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert group_epochs(first.stdout) == [1]
    assert json.load(open(tmp_path / "groups.json"))["epoch"] == 1
    want = reference_groups(tmp_path, 4)
    second = train(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert group_epochs(second.stdout) == [3]
    info = json.load(open(tmp_path / "groups.json"))
    assert info["epoch"] == 3 and info["groups"] == want
    log = read_log(tmp_path)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]
    assert "alpha_mean" not in log[0] and all(len(e["alpha_mean"]) == 4 for e in log[1:])


def test_random_grouping_end_to_end(tmp_path):
    r = train(*FAST, "--grouping", "random", "--num-groups", "3", "--seed", "2", "--epochs", "1",
              "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    want = gbg.random_groups(10, 3, seed=2)
    counts = data_lt.build_data("synthetic-lt", "./data", imb_factor=100, seed=2).class_counts
    assert not np.array_equal(want, gbg.count_groups(counts, 3))  # the baselines differ here
    info = json.load(open(tmp_path / "groups.json"))
    assert info["grouping"] == "random" and info["ncut"] is None
    assert info["groups"] == [np.flatnonzero(want == g).tolist() for g in range(3)]
    assert "class gradients" not in r.stdout  # no gradient pass for a random partition
    assert len(read_log(tmp_path)[0]["alpha_mean"]) == 3


def test_count_bins_grouping_end_to_end(tmp_path):
    """--grouping count_bins: Li et al.'s bins of the synthetic set's counts (reference: each class
    placed by hand by its count), G = the bins used; --num-groups N other than the default refused."""
    counts = data_lt.build_data("synthetic-lt", "./data", imb_factor=100, seed=0).class_counts
    bins = np.array([3 if c >= 1000 else 2 if c >= 100 else 1 if c >= 10 else 0 for c in counts])
    used = sorted(set(bins.tolist()), reverse=True)
    want = np.array([used.index(b) for b in bins])
    r = train(*FAST, "--grouping", "count_bins", "--epochs", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(tmp_path / "groups.json"))
    assert info["grouping"] == "count_bins" and info["num_groups"] == len(used) >= 2
    assert info["groups"] == [np.flatnonzero(want == g).tolist() for g in range(len(used))]
    assert len(read_log(tmp_path)[0]["alpha_mean"]) == len(used)
    refused = train(*FAST, "--grouping", "count_bins", "--num-groups", "3", "--output-dir", str(tmp_path / "x"))
    assert refused.returncode != 0 and "drop --num-groups 3" in refused.stderr and "Traceback" not in refused.stderr


# ----------------------------------------------------------------------------- resume and the log

def test_resume_after_a_kill_between_log_and_checkpoint(tmp_path):
    """Epoch 1's log line is written but its checkpoint is not (the run died in between): the
    resumed run redoes epoch 1 and its log equals the uninterrupted run's, one line per epoch."""
    args = [*FAST, *PLAIN, "--batch-size", "256", "--epochs", "2"]
    ref = train(*args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut"
    assert train(*args, "--output-dir", str(out), "--exit-after-epoch", "0").returncode == 0
    shutil.copy(out / "checkpoint.pth", tmp_path / "epoch0.pth")
    assert train(*args, "--output-dir", str(out)).returncode == 0
    assert [e["epoch"] for e in read_log(out)] == [0, 1]
    shutil.copy(tmp_path / "epoch0.pth", out / "checkpoint.pth")  # as if killed before epoch 1's checkpoint
    (out / "results.json").unlink()
    again = train(*args, "--output-dir", str(out))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    a, b = read_log(tmp_path / "ref"), read_log(out)
    assert [e["epoch"] for e in b] == [0, 1]
    for x, y in zip(a, b):
        for k in ("train_loss", "test_top1", "test_many", "test_few", "lr"):
            assert x[k] == y[k], (x["epoch"], k)
    assert json.load(open(out / "results.json"))["last"] == json.load(open(tmp_path / "ref" / "results.json"))["last"]
    wa, wb = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def cut_run(tmp_path, epochs, stop_after):
    """A PLAIN run of `epochs` epochs in tmp_path, stopped after epoch `stop_after`; returns the
    argv that resumes it."""
    argv = [*FAST, *PLAIN, "--batch-size", "512", "--epochs", str(epochs), "--output-dir", str(tmp_path)]
    assert T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(
        argv + ["--exit-after-epoch", str(stop_after)])) is None
    return argv


def main_of(argv):
    return T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(argv))


def test_resume_takes_best_test_from_the_checkpoint(tmp_path, monkeypatch):
    """Test top-1 peaks at epoch 0 (50); the run stops after epoch 1 and its folder is moved with its
    checkpoint only (log.txt lost): the resumed run's best_test is still epoch 0, from the
    checkpoint, not the best of the epochs it ran (2: 20). A checkpoint from before best_test was
    saved takes it from the log, as before."""
    script_val_and_test(monkeypatch, [10.0, 40.0, 20.0, 30.0] * 2, [50.0, 10.0, 20.0, 5.0] * 2)
    for folder, lose in ((tmp_path / "moved", "log"), (tmp_path / "old", "best_test")):
        argv = cut_run(folder, 4, 1)
        if lose == "log":
            (folder / "log.txt").unlink()
        else:  # as written before best_test was saved
            ckpt = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=False)
            assert ckpt.pop("best_test")["epoch"] == 0
            torch.save(ckpt, folder / "checkpoint.pth")
        results = main_of(argv)
        assert (results["best_test"]["epoch"], results["best_test"]["top1"], results["best_test"]["few"]) == (0, 50.0, 53.0)
        assert json.load(open(folder / "results.json"))["best_test"] == results["best_test"]
        assert read_log(folder)[-1]["best_test_epoch"] == 0


def killed_opening(name, monkeypatch):
    """open() (builtins and io, which pathlib uses) killed right after it opens a file named
    name... for writing: the file is created (or emptied) and nothing is written."""
    import builtins
    import io
    real = io.open

    def opening(file, mode="r", *a, **kw):
        f = real(file, mode, *a, **kw)
        if "w" in mode and Path(str(file)).name.startswith(name):
            f.close()
            raise KeyboardInterrupt("SIGKILL")
        return f
    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)


def test_a_kill_while_the_log_is_cut_to_the_checkpoint_leaves_it_whole(tmp_path, monkeypatch):
    """On resume log.txt is cut to the checkpoint's epochs; a kill while that is written must leave
    the old log (through a temporary file), and the same command then resumes."""
    argv = cut_run(tmp_path, 3, 1)
    shutil.copy(tmp_path / "checkpoint.prev.pth", tmp_path / "checkpoint.pth")  # epoch 1 is to run again
    before = (tmp_path / "log.txt").read_bytes()
    with monkeypatch.context() as m:
        killed_opening("log.txt", m)
        with pytest.raises(KeyboardInterrupt):
            main_of(argv)
    assert (tmp_path / "log.txt").read_bytes() == before
    main_of(argv)
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1, 2]


def test_a_log_line_cut_short_is_dropped_on_resume(tmp_path):
    """A kill (or a node failure) while an epoch's line is written leaves a last line without its
    newline: every reader of log.txt leaves it out, and the resumed run logs that epoch whole."""
    argv = cut_run(tmp_path, 3, 0)
    time_s = read_log(tmp_path)[0]["time_s"]
    partial = '{"epoch": 1, "train_loss": 2.30'
    with open(tmp_path / "log.txt", "a") as f:
        f.write(partial)
    assert T.best_test_in(tmp_path / "log.txt", 5)["epoch"] == 0
    assert T.elapsed_before({}, tmp_path / "log.txt", 5) == time_s  # a checkpoint from before elapsed_s
    main_of(argv)
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1, 2]
    assert partial not in (tmp_path / "log.txt").read_text()


def test_a_damaged_log_line_stops_the_resume_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """A complete line of log.txt that is not an epoch's JSON (a hand edit, a disk fault) is not a
    line cut short by a kill: the resume stops with a UserError (one line) naming the file and the
    line, before it rewrites the log or the checkpoint; mended, the same command resumes."""
    argv = cut_run(tmp_path, 3, 1)
    lines = (tmp_path / "log.txt").read_text().splitlines(keepends=True)
    for bad in ("not json\n", "[1, 2]\n", '{"epoch": "1"}\n'):
        (tmp_path / "log.txt").write_text(lines[0] + bad + lines[1])
        before = {f: (tmp_path / f).read_bytes() for f in ("log.txt", "checkpoint.pth")}
        with pytest.raises(data_lt.UserError) as e:
            main_of(argv)
        assert "\n" not in str(e.value) and f"{tmp_path / 'log.txt'} line 2 " in str(e.value), str(e.value)
        assert {f: (tmp_path / f).read_bytes() for f in before} == before
    (tmp_path / "log.txt").write_text("".join(lines))
    main_of(argv)
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1, 2]


def test_a_fresh_start_removes_the_earlier_runs_outputs(tmp_path):
    """A fresh start in a used --output-dir (no checkpoint: killed before its first one, or moved
    away) removes the earlier run's log.txt, groups.json and results.json, which it would rewrite
    only later; a checkpoint of another run is still refused, and nothing is removed then."""
    for name in ("log.txt", "groups.json", "results.json"):
        (tmp_path / name).write_text('{"epoch": 9, "stale": true}\n')
    argv = cut_run(tmp_path, 2, 0)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "groups.json").exists()  # PLAIN: no groups
    assert [e["epoch"] for e in read_log(tmp_path)] == [0]
    (tmp_path / "results.json").write_text('{"kept": true}\n')
    with pytest.raises(data_lt.UserError, match="--lr"):
        main_of(argv + ["--lr", "0.5"])
    assert json.load(open(tmp_path / "results.json")) == {"kept": True}
    assert [e["epoch"] for e in read_log(tmp_path)] == [0]


# ----------------------------------------------------------------------------- BCL's step

BCL_WRAPPER = """
import argparse, sys
import torch, torch.nn as nn
sys.path.insert(0, {root!r})
torch.set_default_dtype(torch.float64)
import train


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def small_model(arch, num_classes):
    backbone = nn.Sequential(ToDouble(), nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return train.Net(backbone, 16, num_classes)


_epoch = train.train_one_epoch


def record_step(model, loader, optimizer, epoch, args, *rest, **kw):
    batches = list(loader)  # the views are seeded per sample: iterating again gives the same batches
    init = {{k: v.clone() for k, v in model.state_dict().items()}}
    stats = _epoch(model, batches, optimizer, epoch, args, *rest, **kw)
    grads = {{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    torch.save(dict(init=init, batches=batches, grads=grads), f"{{args.output_dir}}/step-rank{{args.rank}}.pth")
    return stats


train.build_model, train.train_one_epoch = small_model, record_step
train.main(argparse.ArgumentParser(parents=[train.get_args_parser()]).parse_args())
"""

# One group (MGDA's direction is then the group's gradient), one step of the whole set (492
# images <= batch 512), --normalize none: p.grad = la_weight * grad(LA) + grad(bcl_weight * BCL).
BCL_FLAGS = ["--dataset", "synthetic-lt", "--device", "cpu", "--batch-size", "512", "--epochs", "1",
             "--loss", "bcl", "--grouping", "random", "--num-groups", "1", "--moo", "mgda", "--normalize", "none",
             "--sampler", "random", "--sync-bn", "--workers", "0", "--print-freq", "1000"]


def small_bcl_model(num_classes, class_counts):
    torch.set_default_dtype(torch.float64)
    try:
        backbone = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False),
                                       torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16),
                                       torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return T.make_bcl_model(T.Net(backbone, 16, num_classes), class_counts)
    finally:
        torch.set_default_dtype(torch.float32)


def direct_bcl_grads(ranks, class_counts, la_weight=2.0, bcl_weight=1.6, temperature=0.1):
    """The gradient of one BCL+GBG step with one group, written from BCL's definition:
    la_weight * LA + bcl_weight * (mean over processes of each process's BCL loss), where
    LA = the mean over the global batch's samples (--loss bcl's default group loss, the release's)
    of the CE of the logit-adjusted cosine logits 30 cos(z, w_k) + log(N_k / N); every BatchNorm, the backbone's and the
    heads', sees every process's views (--sync-bn, as nn.SyncBatchNorm on CUDA); the projection
    head runs over all three views, as BCL's BCLModel.forward and the authors' CIFAR model do,
    before the classification view's rows are dropped; each process's contrastive loss sees its
    own views."""
    model = small_bcl_model(len(class_counts), class_counts)
    model.load_state_dict(ranks[0]["init"])
    model.train()
    parts = [(torch.cat(r["batches"][0][0]).double(), r["batches"][0][1]) for r in ranks]
    z = model.backbone(torch.cat([x for x, _ in parts]))
    log_prior = torch.log(torch.as_tensor(class_counts, dtype=torch.float64) / float(np.sum(class_counts)))
    w = model.fc.weight
    cls_z, cls_y, con_z, offset = [], [], [], 0
    for x, y in parts:
        zr = z[offset:offset + len(x)]
        offset += len(x)
        B = len(y)
        cls_z.append(zr[:B])
        cls_y.append(y)
        con_z.append(zr)
    # the head's BatchNorm over all processes' three views; head_fc's over the K prototypes
    # (every process feeds it the same K rows, whose statistics are those of one copy)
    emb = F.normalize(model.head(torch.cat(con_z)), dim=1).split([len(c) for c in con_z])
    protos = F.normalize(model.head_fc(w), dim=1)
    contrast = sum(T.bcl_loss(e[len(y):], y.repeat(2), protos, temperature) for e, y in zip(emb, cls_y)) / len(parts)
    zc, y = torch.cat(cls_z), torch.cat(cls_y)
    logits = 30.0 * F.normalize(zc, dim=1) @ F.normalize(w, dim=1).T + log_prior
    per_sample = -torch.log_softmax(logits, dim=1)[torch.arange(len(y)), y]
    la = per_sample.mean()
    loss = la_weight * la + bcl_weight * contrast
    names = [n for n, p in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


@pytest.fixture(scope="module")
def bcl_steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bcl_step")
    wrapper = tmp / "record.py"
    wrapper.write_text(BCL_WRAPPER.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for n in (1, 2):
        cmd = [sys.executable, str(wrapper), *BCL_FLAGS, "--output-dir", str(tmp / f"p{n}")]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] + cmd[1:]
        procs[n] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for n, p in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{n} process(es):\n{log[-3000:]}"
    counts = data_lt.build_data("synthetic-lt", "./data", imb_factor=100, seed=0).class_counts
    return {n: [torch.load(tmp / f"p{n}" / f"step-rank{r}.pth", weights_only=False) for r in range(n)]
            for n in (1, 2)}, counts


@pytest.mark.parametrize("nproc", [1, 2])
def test_bcl_step_matches_a_direct_computation(bcl_steps, nproc):
    steps, counts = bcl_steps
    ranks = steps[nproc]
    assert len(ranks[0]["batches"]) == 1 and sum(len(r["batches"][0][1]) for r in ranks) == counts.sum()
    want = direct_bcl_grads(ranks, counts)
    assert set(want) == set(ranks[0]["grads"])
    for r in ranks:
        for k, g in want.items():
            got = r["grads"][k]
            assert got.dtype == torch.float64
            err = (got - g).abs().max().item()
            assert err <= 1e-10 * max(g.abs().max().item(), 1e-3), (nproc, r is ranks[0], k, err)


def test_two_processes_step_like_one(bcl_steps):
    """The same samples, split over two processes: the classification part of the gradient is
    the one-process gradient, the contrastive part the mean of the processes' own losses (so
    the two runs' gradients differ only there; both match the direct computation above)."""
    steps, counts = bcl_steps
    one, two = steps[1][0], steps[2]
    ys = torch.cat([r["batches"][0][1] for r in two])
    assert torch.equal(ys.sort().values, one["batches"][0][1].sort().values)
    for k in one["grads"]:
        assert torch.equal(two[0]["grads"][k], two[1]["grads"][k]), k
