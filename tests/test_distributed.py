"""train.py under torch.distributed on the CPU (gloo): two processes holding half of the batch each
end with the weights, metrics and class groups of one process holding the whole batch.

The runs go through `python -m torch.distributed.run` and train.main, but with a small conv net
in float64 (a wrapper swaps train.build_model and the default dtype). Why: in float32 the
ResNet-32 runs are chaotic at the 1e-2 level after one epoch even between 1 and 2 OpenMP threads
of ONE process, so no distributed implementation could match one process to 1e-4; and the
small net trains in a second, leaving the imports as the cost. Everything the distributed path does
(sharded sampler, global class counts, gradient and Gram all-reduces, GlobalBatchNorm, class
gradients shared out among ranks, rank-0 grouping, evaluation sums) is model-agnostic.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import argparse, os, sys
import torch
import torch.nn as nn
sys.path.insert(0, {root!r})
torch.set_default_dtype(torch.float64)
import data_lt, train

_normalize = data_lt.normalize
data_lt.normalize = lambda *a: _normalize(*a).to(torch.float64)  # images reach the net in float64


def small_model(arch, num_classes):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return train.Net(backbone, 16, num_classes)


def small_model_saving_init(arch, num_classes):
    model = small_model(arch, num_classes)
    if args.rank == 1:  # a different init, which rank 0's broadcast has to overwrite
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    os.makedirs(args.output_dir, exist_ok=True)  # rank 1 may get here before rank 0 makes it
    torch.save(model.state_dict(), f"{{args.output_dir}}/init-rank{{args.rank}}.pth")
    return model


train.build_model = small_model_saving_init
_evaluate = train.evaluate


def evaluate_saving_state(model, *a, **k):  # the model each rank evaluates (the last call's stays)
    torch.save(model.state_dict(), f"{{args.output_dir}}/eval-rank{{args.rank}}.pth")
    return _evaluate(model, *a, **k)


train.evaluate = evaluate_saving_state
parser = argparse.ArgumentParser(parents=[train.get_args_parser()])
for mode, flags in {modes!r}.items():  # one process (group) for all modes: imports are the slow part
    args = parser.parse_args(sys.argv[1:] + flags + ["--output-dir", f"{{sys.argv[-1]}}/{{mode}}"])
    train.main(args)
"""

# 492 images in 10 classes, global batch 64 (2 x 32), two epochs, groups from the initial model.
COMMON = ["--dataset", "synthetic-lt", "--device", "cpu", "--batch-size", "64", "--epochs", "2",
          "--grouping", "gbg", "--num-groups", "4", "--moo", "mgda",
          "--lr", "0.05", "--warmup-epochs", "0.5", "--group-epoch", "0", "--print-freq", "1000", "--workers", "0"]
MODES = {  # the modes whose 2-process run must equal the 1-process run
    "exact": ["--sync-bn", "--sampler", "random", "--moo-grad", "exact"],    # exact class gradients too
    # MGDA-UB: each process's rows of z, their Grams summed, the classifier's gradients summed first
    "features": ["--sync-bn", "--sampler", "random", "--moo-grad", "features"],
    # weights reused between solves, the release's rule and Gram, sketched class gradients
    "every": ["--sync-bn", "--sampler", "random", "--moo-every", "3", "--normalize", "loss+", "--moo-update",
              "raw", "--moo-gram", "backbone", "--sketch-dim", "256"],
    # one global batch, top-ups included; count groups leave the tail group (5 images) out of most batches
    "gac": ["--sync-bn", "--sampler", "gac", "--grouping", "count", "--num-groups", "5"],
    # G chosen by rank 0 from the spectrum, learnt by rank 1 from the broadcast groups; regrouped
    "auto": ["--sync-bn", "--sampler", "gac", "--num-groups", "auto", "--regroup-every", "1"],
    # the plain step (the sample-mean loss on shuffled batches): before the grouping (epoch 0 of 2; 1 is
    # also the default --group-epoch for this 0.5-epoch warm-up, the end of the warm-up), and without
    # any grouping (the CE baseline's flags)
    "pregroup": ["--sync-bn", "--sampler", "gac", "--group-epoch", "1"],
    "plain": ["--sync-bn", "--grouping", "none", "--moo", "none", "--sampler", "random"],
}
# Without --sync-bn each process normalises its own half of the batch, so the run differs from one
# process by design; what must hold is that every process evaluates, groups with and saves one model.
PER_PROCESS_BN = {"nosync": ["--sampler", "gac", "--regroup-every", "1"]}
ALL_MODES = {**MODES, **PER_PROCESS_BN}


def launch(wrapper, out, nproc):
    cmd = [sys.executable, str(wrapper), *COMMON, "--output-dir", str(out)]  # wrapper adds /<mode>
    if nproc > 1:  # --standalone: a private rendezvous on a free port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + cmd[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: {nproc: output folder}}; the one- and two-process runs go side by side, each
    training the modes one after the other."""
    tmp = tmp_path_factory.mktemp("dist")
    wrapper = tmp / "train_float64.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), modes=ALL_MODES))
    procs = {n: launch(wrapper, tmp / f"p{n}", n) for n in (1, 2)}
    for n, p in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{n} process(es):\n{log[-3000:]}"
        if n == 2:  # rank 1 stays quiet
            assert log.count("over 2 processes") == log.count("run: synthetic-lt") == len(ALL_MODES), log[-2000:]
    return {mode: {n: tmp / f"p{n}" / mode for n in (1, 2)} for mode in ALL_MODES}


def load(folder):
    ckpt = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=False)
    log = [json.loads(line) for line in open(folder / "log.txt")]
    return ckpt, log


@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_end_with_the_weights_of_one(runs, mode):
    (one, log1), (two, log2) = load(runs[mode][1]), load(runs[mode][2])
    assert one["model"]["backbone.1.weight"].dtype == torch.float64
    for k, w in one["model"].items():
        diff = (w.double() - two["model"][k].double()).abs().max().item()
        assert diff <= 1e-10, (k, diff)
    # momentum buffers: the same accumulated update directions
    for i, s in one["optimizer"]["state"].items():
        assert torch.allclose(s["momentum_buffer"], two["optimizer"]["state"][i]["momentum_buffer"], rtol=0, atol=1e-10)
    # the global loss (sums over ranks) and the test metrics (per-class counts summed over ranks)
    assert [e["epoch"] for e in log1] == [e["epoch"] for e in log2] == [0, 1]
    for a, b in zip(log1, log2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
        assert ("alpha_mean" in a) == ("alpha_mean" in b)
        if "alpha_mean" in a:
            assert a["alpha_mean"] == pytest.approx(b["alpha_mean"], abs=1e-10)
        # per-class and per-group training losses: sums over the ranks' samples / shares
        for key in ("train_class_loss", "train_group_loss"):
            assert (key in a) == (key in b), key
            if key in a:
                assert [v is None for v in a[key]] == [v is None for v in b[key]], key
                assert [v for v in a[key] if v is not None] == pytest.approx(
                    [v for v in b[key] if v is not None], rel=1e-9), key
        for key in ("test_top1", "test_many", "test_medium", "test_few"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


@pytest.mark.parametrize("mode", list(MODES))
def test_training_moves_far_beyond_the_tolerance(runs, mode):
    """The 1e-10 comparison can fail: every parameter tensor moves by more than 1e-2 from the
    initial weights; and rank 1 built other weights (+0.5), which rank 0's broadcast replaced."""
    final, _ = load(runs[mode][1])
    init = torch.load(runs[mode][1] / "init-rank0.pth", map_location="cpu")
    for k, w in init.items():
        if w.is_floating_point() and "running" not in k:
            assert (final["model"][k] - w).abs().max() > 1e-2, k
    rank0 = torch.load(runs[mode][2] / "init-rank0.pth", map_location="cpu")
    rank1 = torch.load(runs[mode][2] / "init-rank1.pth", map_location="cpu")
    assert torch.equal(rank0["fc.weight"], init["fc.weight"])
    assert torch.allclose(rank1["fc.weight"], init["fc.weight"] + 0.5)


@pytest.mark.parametrize("mode", ["exact", "every"])
def test_distributed_grouping_matches_one_process(runs, mode):
    """Classes shared out among the ranks for class_gradients, rows summed, rank 0's NCut
    broadcast: the same groups, and the same NCut value (so the same affinity), as one process.
    'exact' uses the full gradients, 'every' the 256-dim CountSketch."""
    one = json.load(open(runs[mode][1] / "groups.json"))
    two = json.load(open(runs[mode][2] / "groups.json"))
    assert sorted(sum(one["groups"], [])) == list(range(10)) and one["num_groups"] == 4
    assert one["groups"] == two["groups"]
    assert one["ncut"] == pytest.approx(two["ncut"], abs=1e-9)
    c1 = torch.load(runs[mode][1] / "checkpoint.pth", map_location="cpu", weights_only=False)["groups"]
    c2 = torch.load(runs[mode][2] / "checkpoint.pth", map_location="cpu", weights_only=False)["groups"]
    assert list(c1) == list(c2)


def test_distributed_auto_groups_match_one_process(runs):
    """--num-groups auto: rank 0 alone chooses G; both processes train with it (the weights
    test above) and write what one process writes: the choice, both groupings, their index."""
    one = json.load(open(runs["auto"][1] / "groups.json"))
    two = json.load(open(runs["auto"][2] / "groups.json"))
    assert [h["epoch"] for h in one["history"]] == [0, 1] and one["num_groups_auto"]["epoch"] == 0
    assert one["history"] == two["history"] and one["num_groups"] == two["num_groups"]
    for key in ("num_groups", "structured", "gap_p_values"):
        assert one["num_groups_auto"][key] == two["num_groups_auto"][key], key
    assert one["num_groups_auto"]["eigenvalues"] == pytest.approx(two["num_groups_auto"]["eigenvalues"], abs=1e-12)
    args = [torch.load(runs["auto"][n] / "checkpoint.pth", map_location="cpu", weights_only=False)["args"]
            for n in (1, 2)]
    assert args[0]["num_groups"] == args[1]["num_groups"] == one["num_groups"]


def test_gac_runs_draw_top_ups(runs):
    """The gac mode really completes batches: more samples per epoch than the 492 images, and
    the same number with 1 and 2 processes."""
    for n in (1, 2):
        _, log = load(runs["gac"][n])
        assert all(e["train_samples"] > 492 for e in log), [e["train_samples"] for e in log]
    assert [e["train_samples"] for e in load(runs["gac"][1])[1]] == [e["train_samples"] for e in load(runs["gac"][2])[1]]


def test_without_sync_bn_every_process_holds_the_saved_model(runs):
    """Each process's BatchNorm running statistics follow its own half of the batches; after
    every epoch they are averaged, so both processes evaluated (and regrouped with) the same
    weights and buffers, and those are the checkpoint's."""
    folder = runs["nosync"][2]
    rank0 = torch.load(folder / "eval-rank0.pth", map_location="cpu")
    rank1 = torch.load(folder / "eval-rank1.pth", map_location="cpu")
    saved = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    for k in saved:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], saved[k]), k
    # the halves did see different data: the averaged statistics are not rank 0's own
    one = torch.load(runs["nosync"][1] / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    assert not torch.equal(one["backbone.1.running_mean"], saved["backbone.1.running_mean"])
