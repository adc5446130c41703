"""tests/gpu_repro.sh end to end on the CPU with one epoch, on a tiny JPEG tarball made here in
the CIFAR-10 copy's layout (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_repro_script_runs_one_epoch_on_cpu(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("test", 4)):  # IF 100 keeps 100 ... 1 per class
        for c in range(10):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            base = rng.integers(0, 255, 3)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg")
    tarball = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(src / split, arcname=split)
    out = tmp_path / "out"
    # A decoy `python` first on PATH: the script must run every step under the interpreter it is
    # given (PYTHON, here the one running the tests), never whatever `python` the PATH finds.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for name in ("python", "python3"):
        (decoy / name).write_text("#!/bin/sh\necho decoy python ran >&2\nexit 3\n")
        (decoy / name).chmod(0o755)
    env = dict(os.environ, EPOCHS="1", DEVICE="cpu", TARBALL=str(tarball), DATA=str(tmp_path / "data"),
               OUTDIR=str(out), EXTRA="--arch resnet8 --batch-size 64", OMP_NUM_THREADS="1",
               PYTHON=sys.executable, PATH=f"{decoy}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", str(ROOT / "tests" / "gpu_repro.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "decoy" not in r.stdout + r.stderr
    for name in ("ce", "gbg"):
        wall = json.load(open(out / name / "wall.json"))
        assert wall["exit_code"] == 0 and wall["wall_s"] > 0
        results = json.load(open(out / name / "results.json"))
        assert results["epochs"] == 1 and results["last"]["top1"] is not None
        log = [json.loads(line) for line in open(out / name / "log.txt")]
        assert len(log) == 1 and "test_many" in log[0]
        assert not (out / name / "checkpoint.pth").exists()  # only small JSON files are kept
    assert json.load(open(out / "gbg" / "results.json"))["args"]["moo"] == "mgda"
    assert json.load(open(out / "ce" / "results.json"))["args"]["grouping"] == "none"
