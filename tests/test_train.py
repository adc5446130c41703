"""End-to-end checks of train.py on the CPU: outputs, exact resume after a kill, clear errors,
and the ImageNet-LT split-file path over real image files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Small but real: 10 classes, IF 100 (200 ... 2 images), ResNet-32, CE+GBG+MOO with GAC.
TINY = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--batch-size", "64", "--print-freq", "1000"]


def train(*args, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=e)


def weights(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]


def test_default_command_is_the_paper_setting():
    sys.path.insert(0, str(ROOT))
    import train as T
    args = T.get_args_parser().parse_args([])
    args.world_size = 1
    T.fill_defaults(args)
    assert (args.dataset, args.imb_factor, args.arch, args.loss) == ("cifar10-lt", 100, "resnet32", "ce")
    assert (args.grouping, args.num_groups, args.moo, args.sampler) == ("gbg", 4, "mgda", "gac")
    assert (args.epochs, args.batch_size, args.lr, args.wd, args.schedule) == (200, 256, 0.1, 5e-4, "step")
    # 5-epoch warm-up, x0.1 at 160, x0.01 at 180 (the CIFAR recipe)
    assert T.lr_at(2.5, args) == pytest.approx(0.05, rel=1e-3)
    assert [T.lr_at(e, args) for e in (100, 159.9, 160, 179.9, 180)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_two_epoch_run_writes_all_outputs(tmp_path):
    r = train(*TINY, "--epochs", "2", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert [e["epoch"] for e in log] == [0, 1]
    for e in log:
        for key in ("train_loss", "lr", "test_top1", "test_many", "test_medium", "test_few", "alpha_mean", "time_s",
                    "update_ratio"):
            assert e[key] is not None, key
        assert abs(sum(e["alpha_mean"]) - 1) < 0.5  # means over steps of points on the simplex
        assert 0 < e["update_ratio"] < 10
    groups = json.load(open(tmp_path / "groups.json"))
    assert groups["num_groups"] == 4 and sorted(sum(groups["groups"], [])) == list(range(10))
    assert groups["ncut"] is not None and groups["sizes"] == [len(m) for m in groups["groups"]]
    assert 0.1 <= groups["max_softmax_mean"] <= 1 and groups["recalibrate_bn"] is True
    assert 0 < groups["class_grad_norm_min"] <= groups["class_grad_norm_max"]
    assert groups["graph"] == "W = affinity + 1 off the diagonal, no self-loops (W_ii = 0)"
    assert groups["assign"] == "kmeans (10 restarts, seed 0)"
    results = json.load(open(tmp_path / "results.json"))
    assert results["last"]["top1"] == log[-1]["test_top1"] and results["last"]["epoch"] == 1
    assert set(weights(tmp_path)) and "img/s" in r.stdout and "eta" in r.stdout
    # GAC tops batches up: an epoch processes the 492 images and more
    assert all(e["train_samples"] >= 492 for e in log)
    # the best test epoch, labelled beside the last epoch (no val split here)
    best = max(log, key=lambda e: e["test_top1"])
    assert results["best_test"]["epoch"] == best["epoch"] and results["best_test"]["top1"] == best["test_top1"]
    assert results["best_on_val"] is None and set(results["protocols"]) == {"last", "best_on_val", "best_test"}
    assert [e["best_test_top1"] for e in log] == [max(e["test_top1"] for e in log[:i + 1]) for i in range(len(log))]
    assert "best test epoch" in r.stdout
    # --eval --resume: the checkpoint's accuracy is the one logged for its epoch
    ev = train("--device", "cpu", "--eval", "--resume", str(tmp_path / "checkpoint.pth"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    m = log[-1]
    line = [l for l in ev.stdout.splitlines() if l.startswith("test: ")]
    assert line == [f"test: top-1 {m['test_top1']:.2f}, many {m['test_many']:.2f}, medium {m['test_medium']:.2f}, "
                    f"few {m['test_few']:.2f} ({tmp_path / 'checkpoint.pth'}, epoch 1)"], ev.stdout


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = [*TINY, "--epochs", "4"]
    ref = train(*args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    # Kill (SIGKILL, no chance to clean up) once a checkpoint exists, then start the same command.
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--output-dir", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint.pth").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = [json.loads(line)["epoch"] for line in open(out / "log.txt")]
    assert done and done[-1] < 3, "the run finished before it was killed; the test needs a slower run"
    again = train(*args, "--output-dir", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    a, b = weights(tmp_path / "ref"), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the best test epoch survives the restart (the resumed run reads the epochs it did not redo)
    best = [json.load(open(d / "results.json"))["best_test"] for d in (tmp_path / "ref", out)]
    assert best[0] == best[1] and best[0]["epoch"] in range(4)


def test_exit_after_epoch_then_resume_is_exact(tmp_path):
    args = [*TINY, "--epochs", "2", "--moo-grad", "last", "--moo-every", "2", "--normalize", "loss+"]
    ref = train(*args, "--output-dir", str(tmp_path / "ref"))
    first = train(*args, "--output-dir", str(tmp_path / "cut"), "--exit-after-epoch", "0")
    assert ref.returncode == 0 and first.returncode == 0, ref.stderr[-2000:] + first.stderr[-2000:]
    assert not (tmp_path / "cut" / "results.json").exists()
    second = train(*args, "--output-dir", str(tmp_path / "cut"))
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _one_clear_line(r, *words):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def _write_images(root, n, size=40, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / "train" / f"n{i % 5:08d}" / f"img{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(p)
        paths.append(p.relative_to(root).as_posix())
    return paths


def test_errors_are_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    _one_clear_line(train("--dataset", "imagenet-lt", "--data-root", str(missing), "--device", "cpu",
                          "--output-dir", str(tmp_path / "o1")), str(missing))
    assert not (tmp_path / "o1").exists()  # the run made it and wrote nothing: not left behind empty
    (tmp_path / "o0").mkdir()  # a folder the user made stays
    _one_clear_line(train("--dataset", "imagenet-lt", "--data-root", str(missing), "--device", "cpu",
                          "--output-dir", str(tmp_path / "o0")), str(missing))
    assert (tmp_path / "o0").is_dir()
    # labels out of range in a split file
    root = tmp_path / "inet"
    paths = _write_images(root, 6)
    for split in ("train", "val", "test"):
        (root / f"ImageNet_LT_{split}.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    (root / "ImageNet_LT_train.txt").write_text(f"{paths[0]} 0\n{paths[1]} 1000\n")
    err = _one_clear_line(train("--dataset", "imagenet-lt", "--data-root", str(root), "--device", "cpu",
                                "--output-dir", str(tmp_path / "o2")), "1000")
    assert "ImageNet_LT_train.txt" in err
    # G > K
    _one_clear_line(train(*TINY, "--num-groups", "11", "--epochs", "1", "--output-dir", str(tmp_path / "o3")),
                    "--num-groups")
    # a diverging run: a clear line, and the last checkpoint survives. One step an epoch (batch 512 >
    # 492 images): epoch 0's loss is taken before its huge step, so epoch 0 ends with a checkpoint (a
    # resume cannot change --lr: that would be another experiment) and epoch 1 diverges
    out = tmp_path / "o4"
    err = _one_clear_line(train(*TINY, "--epochs", "2", "--batch-size", "512", "--lr", "1e30", "--warmup-epochs",
                                "0", "--moo", "none", "--grouping", "none", "--sampler", "random",
                                "--output-dir", str(out)), "--lr", f"the checkpoint of epoch 0 in {out} is kept")
    assert "nan" in err.lower() or "inf" in err.lower()
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["epoch"] == 0
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0]


def test_imagenet_lt_split_over_real_images_trains(tmp_path):
    root = tmp_path / "inet"
    paths = _write_images(root, 20, size=48)
    labels = [int(Path(p).parent.name[1:]) for p in paths]
    for split, sel in (("train", slice(0, 14)), ("val", slice(14, 17)), ("test", slice(17, 20))):
        (root / f"ImageNet_LT_{split}.txt").write_text(
            "".join(f"{p} {y}\n" for p, y in zip(paths[sel], labels[sel])))
    out = tmp_path / "out"
    r = train("--dataset", "imagenet-lt", "--data-root", str(root), "--arch", "resnet8", "--device", "cpu",
              "--epochs", "1", "--batch-size", "8", "--workers", "0", "--grouping", "none", "--moo", "none",
              "--sampler", "random", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert results["best_on_val"] is not None and results["last"]["top1"] is not None
    assert "14 training images in 1000 classes" in r.stdout
    # 995 of the 1000 classes have no training image: GBG groups the 5 that do, GAC completes batches
    r = train("--dataset", "imagenet-lt", "--data-root", str(root), "--arch", "resnet8", "--device", "cpu",
              "--epochs", "1", "--batch-size", "8", "--workers", "0", "--num-groups", "2",
              "--output-dir", str(tmp_path / "gbg"))
    assert r.returncode == 0, r.stderr[-3000:]
    groups = json.load(open(tmp_path / "gbg" / "groups.json"))
    assert sorted(sum(groups["groups"], [])) == sorted(set(labels[:14])) and len(groups["no_training_images"]) == 995


def test_moo_ablation_trains_on_plain_batches(tmp_path):
    """--grouping none --moo mgda (every class its own objective) uses plain shuffled batches: an
    epoch processes exactly the 492 training images, no top-ups. Asked for GAC explicitly with
    top-ups that could reach several batches, the run stops with one line."""
    r = train(*TINY, "--grouping", "none", "--moo", "mgda", "--epochs", "1", "--output-dir", str(tmp_path / "moo"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "moo" / "log.txt")]
    assert log[0]["train_samples"] == 492 and len(log[0]["alpha_mean"]) == 10
    assert "sampler random" in r.stdout
    err = _one_clear_line(train(*TINY, "--grouping", "none", "--moo", "mgda", "--sampler", "gac", "--gac-fill", "0.5",
                                "--epochs", "1", "--output-dir", str(tmp_path / "gac")), "--sampler gac", "top-up")
    assert "9 x 32 = 288" in err


def test_classes_without_training_images_train(tmp_path):
    """synthetic-lt at IF 1000 cuts classes 7-9 to no training image (n_k = int(200 * 1000^(-k/9))):
    grouping runs over the 7 classes present, GAC works, evaluation reports every split."""
    out = tmp_path / "gbg"
    r = train(*TINY, "--imb-factor", "1000", "--epochs", "1", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    groups = json.load(open(out / "groups.json"))
    assert groups["no_training_images"] == [7, 8, 9]
    assert sorted(sum(groups["groups"], [])) == list(range(7)) and all(groups["groups"])
    assert "3 classes have no training image" in r.stdout
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert log[0]["test_few"] is not None and log[0]["train_samples"] >= 370
    for flags in (["--grouping", "none", "--moo", "mgda", "--sampler", "gac"], ["--grouping", "count"]):
        r = train(*TINY, "--imb-factor", "1000", "--epochs", "1", *flags, "--output-dir", str(tmp_path / flags[1]))
        assert r.returncode == 0, (flags, r.stderr[-3000:])
    # 7 classes can make at most 7 groups
    _one_clear_line(train(*TINY, "--imb-factor", "1000", "--num-groups", "8", "--epochs", "1",
                          "--output-dir", str(tmp_path / "g8")), "--num-groups 8", "7 classes")


def parse(*argv, world_size=1):
    sys.path.insert(0, str(ROOT))
    import train as T
    args = T.get_args_parser().parse_args(list(argv))
    args.world_size = world_size
    T.fill_defaults(args)
    return T, args


@pytest.mark.parametrize("argv, words", [
    (["--gac-fill", "0"], "--gac-fill"), (["--gac-fill", "1.5"], "--gac-fill"),
    (["--sketch-dim", "-1"], "--sketch-dim"), (["--grad-max-per-class", "0"], "--grad-max-per-class"),
    (["--num-groups", "0"], "--num-groups"), (["--eval-every", "0"], "--eval-every"),
    (["--batch-size", "0"], "--batch-size 0: give a positive batch size"), (["--lr-drops", "180", "160"], "--lr-drops"),
    (["--epochs", "0"], "--epochs"), (["--preset", "release", "--dataset", "imagenet-lt"], "--preset release"),
    (["--resume", "x.pth"], "--resume"), (["--eval"], "--eval")])
def test_bad_flags_name_the_flag(argv, words):
    """Flags that gbg.py would reject (with a ValueError and a traceback) or that would divide by
    zero are refused up front, in one line naming the flag."""
    sys.path.insert(0, str(ROOT))
    import data_lt
    with pytest.raises(data_lt.UserError, match=words) as e:
        parse(*argv)
    assert "\n" not in str(e.value)


def test_eval_without_resume_is_one_line(tmp_path):
    """--eval alone used to end in a TypeError traceback (the checkpoint is read before the flags
    are checked); the command line as a user types it, in a subprocess."""
    _one_clear_line(train("--eval", "--device", "cpu", "--output-dir", str(tmp_path / "o")), "--eval and --resume PATH")
    assert not (tmp_path / "o").exists()


def test_bad_gbg_argument_is_one_line(tmp_path):
    _one_clear_line(train(*TINY, "--gac-fill", "1.5", "--epochs", "1", "--output-dir", str(tmp_path)), "--gac-fill")


def test_workers_default_to_the_cores_this_process_may_use():
    _, args = parse()
    assert args.workers == min(len(os.sched_getaffinity(0)), 8)
    assert parse("--workers", "3")[1].workers == 3


def test_training_seed_does_not_change_the_data(monkeypatch, tmp_path):
    """build_data gets --data-seed (default 0, the LDAM-DRW / BCL subset), never --seed."""
    _, args = parse()
    T = sys.modules["train"]
    import data_lt
    seen = []

    class Stop(Exception):
        pass

    def fake_build_data(*a, **k):
        seen.append(k["seed"])
        raise Stop
    monkeypatch.setattr(data_lt, "build_data", fake_build_data)
    for argv in (["--seed", "5"], ["--seed", "5", "--data-seed", "3"]):
        args = T.get_args_parser().parse_args(argv + ["--device", "cpu", "--dataset", "synthetic-lt",
                                                      "--output-dir", str(tmp_path)])
        with pytest.raises(Stop):
            T.main(args)
    assert seen == [0, 3]


def test_release_preset_and_recipes():
    """--preset release: the authors' CIFAR script, field by field; explicit flags still win."""
    T, args = parse("--preset", "release")
    want = dict(loss="bcl", imb_factor=50, epochs=300, lr=0.1, wd=5e-4, warmup_epochs=5, lr_drops=[160, 180],
                sampler="random", group_loss="sample", bcl_group_loss="ce", normalize="loss+", moo_update="raw",
                moo_gram="backbone", arch="resnet32", batch_size=256, num_groups=4, group_epoch=0, grouping="gbg",
                recalibrate_bn=False, moo_grad="exact", moo_every=1, ncut_assign="cluster_qr")
    assert {k: getattr(args, k) for k in want} == want
    # adjust_lr of the release: x0.1 after epoch 160, x0.01 after 180, flat to 300
    assert [T.lr_at(e, args) for e in (100, 159.9, 160, 179.9, 180, 299.9)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert parse("--preset", "release", "--epochs", "10", "--normalize", "l2")[1].epochs == 10
    # --preset paper: the paper's text where the defaults differ from it
    _, paper = parse("--preset", "paper")
    assert (paper.normalize, paper.recalibrate_bn, paper.group_epoch, paper.moo_update, paper.group_loss,
            paper.sampler, paper.loss) == ("none", False, 0, "scaled", "class", "gac", "ce")
    # without the preset: the paper's defaults
    _, plain = parse()
    assert (plain.loss, plain.imb_factor, plain.normalize, plain.group_loss, plain.bcl_group_loss,
            plain.moo_update, plain.moo_gram, plain.sampler, plain.recalibrate_bn, plain.ncut_assign) == (
        "ce", 100, "l2", "class", "la", "scaled", "all", "gac", True, "kmeans")
    assert parse("--preset", "release", "--ncut-assign", "kmeans")[1].ncut_assign == "kmeans"
    # BCL's recipes: no warm-up on ImageNet-LT and iNat, lr 0.2 on iNat
    _, inet = parse("--dataset", "imagenet-lt")
    _, inat = parse("--dataset", "inat2018")
    assert (inet.lr, inet.warmup_epochs, inet.epochs, inet.schedule) == (0.1, 0, 90, "cosine")
    assert (inat.lr, inat.warmup_epochs, inat.epochs, inat.wd) == (0.2, 0, 100, 1e-4)
    assert parse("--dataset", "inat2018", "--lr", "0.1", "--warmup-epochs", "5")[1].warmup_epochs == 5
    # --grouping none: plain batches unless asked
    assert parse("--grouping", "none")[1].sampler == "random"
    assert parse("--grouping", "none", "--sampler", "gac")[1].sampler == "gac"


class _Trained(Exception):
    pass


def test_release_preset_groups_with_cluster_qr_and_records_it(monkeypatch, tmp_path):
    """--preset release groups (at epoch 0, before any training) with cluster_qr on the graph
    without self-loops, and groups.json says so. CIFAR-10-LT replaced by synthetic-lt (the preset
    asks for a CIFAR data set; the test must not download it); the groups are those of
    gbg.ncut_groups(..., assign="cluster_qr") on the affinity train.py computed."""
    T, _ = parse()
    import data_lt
    import gbg
    real_build, real_ncut, calls = data_lt.build_data, gbg.ncut_groups, []
    monkeypatch.setattr(data_lt, "build_data", lambda name, root, **kw: real_build("synthetic-lt", root, **kw))

    def recording_ncut(A, G, **kw):
        calls.append((A, G, kw))
        return real_ncut(A, G, **kw)
    monkeypatch.setattr(gbg, "ncut_groups", recording_ncut)
    monkeypatch.setattr(T, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(_Trained()))
    out = tmp_path / "release"
    argv = ["--preset", "release", "--arch", "resnet8", "--device", "cpu", "--workers", "0", "--batch-size", "64",
            "--output-dir", str(out)]
    with pytest.raises(_Trained):
        T.main(T.get_args_parser().parse_args(argv))
    groups = json.load(open(out / "groups.json"))
    assert groups["epoch"] == 0 and groups["assign"] == "cluster_qr"
    assert groups["graph"] == gbg.NCUT_GRAPH == "W = affinity + 1 off the diagonal, no self-loops (W_ii = 0)"
    (A, G, kw), = calls
    assert G == 4 and kw["assign"] == "cluster_qr"
    want = real_ncut(A, G, assign="cluster_qr")
    assert groups["groups"] == [np.flatnonzero(want == g).tolist() for g in range(want.max() + 1)]


def test_class_objectives_refused_when_their_gradients_cannot_fit(monkeypatch, tmp_path):
    """--grouping none --moo mgda: the worst case, min(classes, batch) objectives, each a row of
    MGDA's [objectives, P] gradient matrix (P: every parameter the class losses reach, float32),
    is checked against the memory available (a monkeypatched figure here) before training: one
    line with the estimate and the fixes, and no checkpoint touched. The estimate is counted
    here from the model's parameters, independently of train.py's helpers."""
    T, _ = parse()
    import data_lt
    net = T.build_model("resnet8", 10)
    P = sum(p.numel() for p in net.parameters())  # CE: backbone + fc, all reached by the class losses
    last = sum(p.numel() for b in net.backbone.blocks[-1:] for p in b.parameters()) + sum(
        p.numel() for p in net.fc.parameters())  # ResNet-8: one block a stage, the last one
    need = 10 * P * 4  # synthetic-lt: 10 classes < batch 64
    seen = []

    def fake(device):
        seen.append(device)
        return free
    monkeypatch.setattr(T, "available_memory", fake)
    argv = [*TINY[:TINY.index("--print-freq")], "--workers", "0", "--grouping", "none", "--moo", "mgda", "--epochs",
            "1", "--output-dir", str(tmp_path / "out")]
    free = need - 1
    with pytest.raises(data_lt.UserError) as e:
        T.main(T.get_args_parser().parse_args(argv))
    msg = str(e.value)
    assert "\n" not in msg and seen and seen[0].type == "cpu"
    assert f"[10, {P:,}] torch.float32" in msg and f"{need / 2**30:.1f} GiB" in msg
    assert "--moo-grad last" in msg and f"{10 * last * 4 / 2**30:.1f} GiB" in msg and "--grouping gbg" in msg
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    # a batch smaller than the classes bounds the objectives: 8 rows; and the fix names the batch that fits
    free = 8 * P * 4 - 1
    with pytest.raises(data_lt.UserError, match=rf"up to 8 objectives .*\[8, {P:,}\].*--batch-size 7 or less"):
        T.main(T.get_args_parser().parse_args(argv[:-2] + ["--batch-size", "8", "--output-dir", str(tmp_path / "b8")]))
    # --moo-grad last holds the last stage's rows only
    free = 10 * last * 4
    monkeypatch.setattr(T, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(_Trained()))
    with pytest.raises(_Trained):
        T.main(T.get_args_parser().parse_args(argv + ["--moo-grad", "last"]))


def test_available_memory_is_plausible():
    T, _ = parse()
    avail = T.available_memory(torch.device("cpu"))
    assert 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
