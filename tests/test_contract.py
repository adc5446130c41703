"""train.py's contract with the person running it (issue 24): a resume never continues another
experiment under new flags; an error in a DataLoader worker ends the process with one line instead
of a hang; the same command gives the same run whatever --workers; bad input and interruptions end
in one line before any work is lost, and say which checkpoint is kept."""
import argparse
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
from PIL import Image

import data_lt
import gbg
import train as T

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--batch-size", "128",
        "--print-freq", "1000", "--workers", "0"]
PLAIN = ["--grouping", "none", "--moo", "none", "--sampler", "random"]


def train(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def start(*args, cwd=ROOT):
    """train.py as a terminal's foreground process: Ctrl-C's SIGINT not ignored (as it is in
    the processes of a shell's background job, this test's perhaps, which a child inherits)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(*argv):
    """train.main in this process (no interpreter start: the cheap way to run many short cases)."""
    return T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args([str(a) for a in argv]))


def one_line(rc, err, *words):
    assert rc != 0
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    for w in words:
        assert w in err, (w, err)
    return err


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.txt")]


def image_tree(root, size=72, per_class=(4, 2), classes=3, ext="png"):
    """folder-lt's train/<class>/ and test/<class>/ of random images; above 64 px they are read from
    disk by DataLoader workers (image files, ImageNet transforms), at or below it decoded into one tensor."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size, 3)) * 120 + np.roll([100, 60, 20], k)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{k}" / f"{i}.{ext}")
    return root


# ------------------------------------------------------------------------------------------ 2. workers
def bad_image_cases(tmp_path):
    """Two data sets with one bad image each: a folder-lt tree of 72 px images with a truncated JPEG
    (met by the grouping's loader: GBG groups at epoch 0), and an ImageNet-LT split file of 2,100
    lines, more than read_split checks one by one, whose unchecked lines name missing images (met
    by the training loader)."""
    folder = image_tree(tmp_path / "folder", ext="jpg", per_class=(3, 1))
    jpeg = folder / "train" / "c1" / "1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    inet = tmp_path / "inet"
    image_tree(inet, size=16, per_class=(1, 1), classes=1)
    real = "train/c0/0.png"
    n = data_lt.CHECK_ALL_UP_TO + 100
    checked = {0, *np.random.RandomState(0).choice(n, 1000, replace=False).tolist()}  # read_split's sample
    lines = [f"{real if i in checked else f'train/missing/{i}.png'} {i % 5}\n" for i in range(n)]
    (inet / "ImageNet_LT_train.txt").write_text("".join(lines))
    for split in ("val", "test"):
        (inet / f"ImageNet_LT_{split}.txt").write_text(f"{real} 0\n")
    common = ["--arch", "resnet8", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--print-freq", "1000"]
    return {"corrupt jpeg": (["--dataset", "folder-lt", "--data-root", folder, "--imb-factor", "1", "--num-groups", "2",
                              *common], ["cannot decode image", str(jpeg)]),
            "missing image": (["--dataset", "imagenet-lt", "--data-root", inet, *PLAIN, *common],
                              ["does not exist", "train/missing/"])}


def test_a_bad_image_ends_the_run_with_one_line_whatever_the_workers(tmp_path):
    """With 2 DataLoader workers, a corrupt or missing image ends the process at once with one line
    and a non-zero exit code (workers ignore SIGTERM, and multiprocessing ends them at exit with
    SIGTERM and then waits: the process used to hang after a traceback); with none, the same line
    (as the UserError that train.py prints as one line: no process needed)."""
    cases = bad_image_cases(tmp_path)
    procs = {name: (start(*argv, "--workers", 2, "--output-dir", tmp_path / name), words, time.time())
             for name, (argv, words) in cases.items()}
    for name, (argv, words) in cases.items():
        with pytest.raises(data_lt.UserError) as e:
            run(*argv, "--workers", 0, "--output-dir", tmp_path / f"{name} 0")
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    for name, (p, words, t0) in procs.items():
        try:
            out, err = p.communicate(timeout=600)  # seconds on an idle machine; a hang never ends
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"{name}, --workers 2: still running after {time.time() - t0:.0f} s")
        one_line(p.returncode, err, *words)


def test_utf8_byte_order_mark_in_a_split_file(tmp_path):
    image_tree(tmp_path, size=16, per_class=(2, 1), classes=2)
    (tmp_path / "list.txt").write_bytes("\ufefftrain/c0/0.png 0\ntrain/c1/1.png 1\n".encode("utf-8"))
    assert data_lt.read_split(str(tmp_path), "list.txt", 2) == [("train/c0/0.png", 0, 1), ("train/c1/1.png", 1, 2)]


# ------------------------------------------------------------------------------------------ 4. same run
def test_image_files_train_the_same_with_0_1_and_2_workers(tmp_path):
    """Images above 64 px are cropped and flipped in DataLoader workers: each sample's draws come from
    (seed, epoch, sample), so 0, 1 and 2 workers give the same losses and weights, as the BCL views."""
    data = image_tree(tmp_path / "data", per_class=(2, 1))
    runs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        run("--dataset", "folder-lt", "--data-root", data, "--imb-factor", "1", "--arch", "resnet8", "--device", "cpu",
            "--epochs", "2", "--batch-size", "3", "--print-freq", "1000", *PLAIN, "--workers", workers,
            "--output-dir", out)
        runs[workers] = ([e["train_loss"] for e in read_log(out)],
                         torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"])
    (loss0, w0) = runs[0]
    for workers in (1, 2):
        loss, w = runs[workers]
        assert loss == loss0, (workers, loss, loss0)
        assert all(torch.equal(w0[k], w[k]) for k in w0), workers
    assert loss0[0] != loss0[1]


