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
        for key in ("train_loss", "lr", "test_top1", "test_many", "test_medium", "test_few", "alpha_mean", "time_s"):
            assert e[key] is not None, key
        assert abs(sum(e["alpha_mean"]) - 1) < 0.5  # means over steps of points on the simplex
    groups = json.load(open(tmp_path / "groups.json"))
    assert groups["num_groups"] == 4 and sorted(sum(groups["groups"], [])) == list(range(10))
    assert groups["ncut"] is not None
    results = json.load(open(tmp_path / "results.json"))
    assert results["last"]["top1"] == log[-1]["test_top1"]
    assert set(weights(tmp_path)) and "img/s" in r.stdout and "eta" in r.stdout


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
    # a diverging run: a clear line, and the last checkpoint survives
    out = tmp_path / "o4"
    assert train(*TINY, "--epochs", "1", "--output-dir", str(out)).returncode == 0
    before = weights(out)
    err = _one_clear_line(train(*TINY, "--epochs", "2", "--lr", "1e30", "--moo", "none",
                                "--grouping", "none", "--sampler", "random", "--output-dir", str(out)), "--lr")
    assert "nan" in err.lower() or "inf" in err.lower()
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


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
