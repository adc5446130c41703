"""tests/make_cifar_jpeg.py on a tiny fake set of CIFAR-10 python files written here (no download,
no shared data): the layout (train/<class>/NNNN.jpg in the python files' order), the quantisation
tables against libjpeg's quality-75 tables derived here from the JPEG standard's Annex K (and
against the values read from the CIFAR-10 JPEG copy), 4:2:0 sampling, the decoded pixels against
the source, and --check, which must tell a copy made at another quality."""
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image, JpegImagePlugin

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_cifar_jpeg", ROOT / "tests" / "make_cifar_jpeg.py")
mcj = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mcj)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# ITU-T T.81 Annex K, Tables K.1 (luminance) and K.2 (chrominance), in natural (row-major) order
K1 = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
      49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
K2 = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
      47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def libjpeg_tables(quality):
    """libjpeg's jpeg_quality_scaling and jpeg_add_quant_table (baseline: clamped to 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return {i: [min(max((b * scale + 50) // 100, 1), 255) for b in base] for i, base in enumerate((K1, K2))}


# Read with PIL from the CIFAR-10 JPEG copy (every one of its 60,000 files has these, 4:2:0, 32 x 32)
COPY_TABLES = {
    0: [8, 6, 5, 8, 12, 20, 26, 31, 6, 6, 7, 10, 13, 29, 30, 28, 7, 7, 8, 12, 20, 29, 35, 28, 7, 9, 11, 15, 26, 44,
        40, 31, 9, 11, 19, 28, 34, 55, 52, 39, 12, 18, 28, 32, 41, 52, 57, 46, 25, 32, 39, 44, 52, 61, 60, 51, 36,
        46, 48, 49, 56, 50, 52, 50],
    1: [9, 9, 12, 24, 50, 50, 50, 50, 9, 11, 13, 33, 50, 50, 50, 50, 12, 13, 28, 50, 50, 50, 50, 50, 24, 33, 50,
        50, 50, 50, 50, 50] + [50] * 32,
}


def smooth_images(n, rng):
    """Colour fields with a little texture: JPEG keeps them close, so a decoded file finds its source."""
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)
    return np.clip(up + rng.normal(0, 4, up.shape), 0, 255).astype(np.uint8)


def write_fake_cifar(root, rng, per_batch=12, test=15):
    """cifar-10-batches-py/ as the official files hold it: data [N, 3072] uint8 (R, G, B planes),
    labels a list, batches.meta's label_names. Returns {split: (images HWC, labels)}."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train": ([], []), "test": ([], [])}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        x, y = smooth_images(n, rng), rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(n, -1), "labels": y}, f)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(x)
        out[split][1].extend(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return {s: (np.concatenate(x), np.array(y)) for s, (x, y) in out.items()}


@pytest.fixture
def made(tmp_path, monkeypatch):
    # the official files' md5 sums are checked by torchvision; these fake ones would fail them
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    source = write_fake_cifar(tmp_path / "root", np.random.default_rng(0))
    assert mcj.main(["--root", str(tmp_path / "root"), "--out", str(tmp_path / "copy")]) == 0
    return tmp_path / "copy", source


def test_libjpeg_q75_tables_are_the_copys():
    assert libjpeg_tables(75) == COPY_TABLES
    assert libjpeg_tables(90) != COPY_TABLES  # the tables tell the quality


def test_layout_follows_the_python_files_order(made):
    copy, source = made
    for split, (x, y) in source.items():
        assert sorted(p.name for p in (copy / split).iterdir()) == CLASSES
        for k, name in enumerate(CLASSES):
            files = sorted((copy / split / name).iterdir())
            assert [f.name for f in files] == [f"{i:04d}.jpg" for i in range((y == k).sum())]
        # each file decodes closest to the image it should hold: the n-th image of its class in file order
        decoded = [np.asarray(Image.open(copy / split / CLASSES[k] / f"{int((y[:i] == k).sum()):04d}.jpg"))
                   for i, k in enumerate(y)]
        for i, d in enumerate(decoded):
            errors = np.abs(x.astype(int) - d.astype(int)).mean(axis=(1, 2, 3))
            assert errors.argmin() == i and errors[i] < 20, (split, i, errors[i])


def test_files_are_quality_75_with_420_sampling(made):
    copy, _ = made
    files = sorted(copy.glob("*/*/*.jpg"))
    assert len(files) == 5 * 12 + 15
    for f in files:
        im = Image.open(f)
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
        assert {k: list(v) for k, v in im.quantization.items()} == libjpeg_tables(75), f
        assert JpegImagePlugin.get_sampling(im) == 2, f  # 4:2:0
        assert im.info["jfif_version"] == (1, 1) and not im.info.get("progressive"), f  # as the copy's


def test_check_tells_another_encoder(made, tmp_path, capsys):
    copy, _ = made
    assert mcj.main(["--check", str(copy)]) == 0
    assert "keep their quantisation tables and sampling" in capsys.readouterr().out
    other = tmp_path / "q90"
    for f in copy.glob("*/*/*.jpg"):  # the same images at quality 90, or at 4:4:4
        (other / f.relative_to(copy)).parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).save(other / f.relative_to(copy), "JPEG", quality=90, subsampling=2)
    assert mcj.check(other, n=10)[1] == 0
    for f in other.glob("*/*/*.jpg"):
        Image.open(copy / f.relative_to(other)).save(f, "JPEG", quality=75, subsampling=0)
    assert mcj.check(other, n=10)[1] == 0


def test_refuses_a_copy_already_there(tmp_path, made):
    copy, _ = made
    with pytest.raises(SystemExit, match="already holds train/"):
        mcj.main(["--root", str(tmp_path / "root"), "--out", str(copy)])


def test_missing_root_gives_one_line(tmp_path):
    with pytest.raises(SystemExit, match="give the folder holding cifar-10-batches-py"):
        mcj.main(["--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "new")])
