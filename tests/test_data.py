"""data_lt: long-tail profiles, data sets built from files the tests write, loaders, errors."""
import os
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import BatchSampler, SequentialSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_lt  # noqa: E402
from data_lt import (CIFAR_MEAN, CIFAR_STD, UserError, ImageList, TensorImages, augment_draws,  # noqa: E402
                     build_data, gpu_augment, lt_counts, lt_indices, make_loader, shot_masks)

torch.set_num_threads(1)


def one_line_error(fn, *needles):
    """Run fn, expect UserError with a one-line message containing every needle."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


def save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


# --- long-tail profile ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, per_class, total", [(10, 5000, 12406), (100, 500, 10847)])
def test_published_cifar_lt_totals(num_classes, per_class, total):
    targets = np.repeat(np.arange(num_classes), per_class)
    assert sum(lt_counts(per_class, num_classes, 100)) == total
    keep = lt_indices(targets, 100)
    assert len(keep) == total and len(np.unique(keep)) == total
    counts = np.bincount(targets[keep], minlength=num_classes)
    assert counts[0] == per_class and counts[-1] == per_class // 100


@pytest.mark.parametrize("imb_factor", [50, 10])
def test_profile_is_monotone_with_the_requested_ratio(imb_factor):
    counts = np.array(lt_counts(5000, 10, imb_factor))
    assert counts[0] == 5000 and np.all(np.diff(counts) < 0)
    assert abs(counts[-1] - 5000 / imb_factor) <= 1
    assert sum(counts) > sum(lt_counts(5000, 10, imb_factor * 2))
    assert lt_counts(7, 5, 1) == [7] * 5


def test_lt_indices_reproduces_the_ldam_seed_convention():
    # Shuffled, unequal class sizes (n_max is the largest class), labels not sorted.
    rng = np.random.RandomState(123)
    targets = rng.permutation(np.concatenate([np.full(n, k) for k, n in enumerate([60, 80, 70, 50, 65])]))
    # Independent re-derivation: global seed, shuffle each class's indices, keep the first n_k
    # where n_k follows the LDAM-DRW formula n_max * (1/IF)^(k/(K-1)).
    state = np.random.get_state()
    np.random.seed(0)
    expect = []
    for k in range(5):
        idx = np.where(targets == k)[0]
        np.random.shuffle(idx)
        expect.append(idx[:int(80 * (1 / 20) ** (k / 4.0))])
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    got = lt_indices(targets, 20, seed=0)
    np.testing.assert_array_equal(got, np.concatenate(expect))
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global RNG left alone
    assert not np.array_equal(np.sort(lt_indices(targets, 20, seed=1)), np.sort(got))


def test_shot_masks_boundaries():
    m = shot_masks(np.array([101, 100, 20, 19, 500, 1]))
    assert m["many"].tolist() == [True, False, False, False, True, False]
    assert m["medium"].tolist() == [False, True, True, False, False, False]
    assert m["few"].tolist() == [False, False, False, True, False, True]


def test_bad_imbalance_factor():
    one_line_error(lambda: lt_counts(100, 10, 0.01), "0.01")


# --- folder-lt ------------------------------------------------------------------------------------

def write_folder(root, n_train=(20, 20, 20), n_test=4, size=32):
    """Train PNGs carry their (class, index) in pixel (0,0); test JPEGs are flat colours."""
    rng = np.random.RandomState(0)
    written = {}
    for k, name in enumerate(["cat", "ant", "bee"]):  # sorted: ant=0, bee=1, cat=2
        for i in rng.permutation(n_train[k]):  # written out of name order
            a = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
            a[0, 0, :2] = (k, i)
            save(f"{root}/train/{name}/{i:03d}.png", a)
            written[(k, i)] = a
        for i in range(n_test):
            save(f"{root}/test/{name}/{i:03d}.jpg", np.full((size, size, 3), (40 * k, 50 * i, 128), np.uint8),
                 quality=95)
    return written


def test_folder_lt_small_images_decode_exactly(tmp_path):
    root = str(tmp_path)
    written = write_folder(root)
    d = build_data("folder-lt", root, imb_factor=10, seed=0)
    label_of = {"ant": 0, "bee": 1, "cat": 2}
    assert d.kind == "tensor" and d.num_classes == 3 and d.val is None
    assert d.class_counts.tolist() == lt_counts(20, 3, 10) == [20, 6, 2]
    assert d.train.images.shape == (28, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert (d.mean, d.std) == (CIFAR_MEAN, CIFAR_STD)
    seen = []
    for img, y in zip(d.train.images, d.train.targets):
        k, i = int(img[0, 0, 0]), int(img[1, 0, 0])
        name = ["cat", "ant", "bee"][k]
        assert label_of[name] == y  # labels follow sorted folder names, not write order
        assert torch.equal(img, torch.from_numpy(written[(k, i)]).permute(2, 0, 1))  # PNG exact
        seen.append((k, i))
    # Which files are kept: the seed convention applied to each class's files in name order.
    state = np.random.get_state()
    np.random.seed(0)
    expect = []
    for k, quota in zip([1, 2, 0], [20, 6, 2]):  # ant, bee, cat
        position = np.arange(20)
        np.random.shuffle(position)
        expect += [(k, int(i)) for i in position[:quota]]
    np.random.set_state(state)
    assert seen == expect
    # The test split is complete: 4 flat JPEGs per class, decoded within JPEG error.
    assert len(d.test) == 12 and np.bincount(d.test.targets.numpy()).tolist() == [4, 4, 4]
    for img, y in zip(d.test.images, d.test.targets):
        k = ["cat", "ant", "bee"].index(["ant", "bee", "cat"][y])
        colour = img.float().mean((1, 2))
        assert abs(colour[0] - 40 * k) < 3 and abs(colour[2] - 128) < 3
    # train_eval is the same samples, unaugmented.
    x, y = d.train_eval[3]
    assert x.shape == (3, 32, 32) and y == int(d.train.targets[3])


def test_folder_lt_large_images_are_files_kind(tmp_path):
    root = str(tmp_path)
    write_folder(root, n_train=(4, 3, 2), n_test=1, size=80)
    d = build_data("folder-lt", root, imb_factor=2)
    # ant/bee/cat hold 3/2/4 images; the profile from n_max = 4 is [4, 2, 2]; a class below its
    # quota keeps all it has.
    assert d.kind == "files" and d.class_counts.tolist() == [3, 2, 2]
    x, y = d.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    x, y = d.test[2]
    assert x.shape == (3, 224, 224) and y == 2


def test_folder_lt_errors(tmp_path):
    root = str(tmp_path)
    one_line_error(lambda: build_data("folder-lt", f"{root}/nowhere"), f"{root}/nowhere")
    os.makedirs(f"{root}/train/a")
    one_line_error(lambda: build_data("folder-lt", root), root, "test/")
    save(f"{root}/test/a/0.png", np.zeros((8, 8, 3), np.uint8))
    one_line_error(lambda: build_data("folder-lt", root), f"{root}/train/a")  # empty class folder
    save(f"{root}/train/a/0.png", np.zeros((8, 8, 3), np.uint8))
    os.makedirs(f"{root}/test/b")
    one_line_error(lambda: build_data("folder-lt", root), "'b'")  # class folders differ
    os.rmdir(f"{root}/test/b")
    save(f"{root}/train/a/1.png", np.zeros((9, 8, 3), np.uint8))
    one_line_error(lambda: build_data("folder-lt", root, imb_factor=1), f"{root}/train/a/1.png")  # mixed sizes


# --- split files ----------------------------------------------------------------------------------

def write_split_root(root, entries, size=(40, 30)):
    """entries: {list file: [(relative path, label)]}; images are PNGs with a per-file colour."""
    pixels = {}
    for list_file, rows in entries.items():
        with open(f"{root}/{list_file}", "w") as f:
            for rel, y in rows:
                f.write(f"{rel} {y}\n")
                if rel not in pixels:
                    a = np.random.RandomState(len(pixels)).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    save(f"{root}/{rel}", a)
                    pixels[rel] = a
    return pixels


def test_imagenet_lt_split_files(tmp_path):
    root = str(tmp_path)
    train = [("train/n1/a b.png", 0), ("train/n1/c.png", 0), ("train/n2/d.png", 999), ("train/n3/e.png", 7)]
    entries = {"ImageNet_LT_train.txt": train, "ImageNet_LT_val.txt": [("val/v.png", 3)],
               "ImageNet_LT_test.txt": [("val/v.png", 3), ("test/t.png", 999)]}
    pixels = write_split_root(root, entries)
    d = build_data("imagenet-lt", root)
    assert d.kind == "files" and d.num_classes == 1000 and len(d.class_counts) == 1000
    assert d.class_counts.sum() == 4 and d.class_counts[[0, 7, 999]].tolist() == [2, 1, 1]
    assert len(d.val) == 1 and len(d.test) == 2 and d.test.targets == [3, 999]
    for ds in (d.train, d.train_eval):
        x, y = ds[2]
        assert x.shape == (3, 224, 224) and y == 999
    # Eval transform is deterministic; the train one draws crops.
    assert torch.equal(d.train_eval[1][0], d.train_eval[1][0])
    raw = ImageList(root, "ImageNet_LT_train.txt", 1000)  # no transform: the PIL image itself
    assert raw.targets == [0, 0, 999, 7]
    for i, (rel, y) in enumerate(train):
        img, label = raw[i]
        assert label == y and np.array_equal(np.asarray(img), pixels[rel])


def test_inat2018_reports_val_as_test(tmp_path):
    root = str(tmp_path)
    write_split_root(root, {"iNaturalist18_train.txt": [("a/1.png", 8141), ("a/2.png", 0)],
                                  "iNaturalist18_val.txt": [("b/1.png", 5)]})
    d = build_data("inat2018", root)
    assert d.num_classes == 8142 and d.val is None and d.test.targets == [5]
    assert d.class_counts[8141] == 1 and d.test[0][0].shape == (3, 224, 224)


def test_split_file_errors(tmp_path):
    root = str(tmp_path)
    one_line_error(lambda: build_data("imagenet-lt", f"{root}/none"), f"{root}/none")
    one_line_error(lambda: build_data("imagenet-lt", root), f"{root}/ImageNet_LT_train.txt")
    write_split_root(root, {"ok.txt": [("x/1.png", 1), ("x/2.png", 2)]})
    assert len(ImageList(root, "ok.txt", 3)) == 2

    def write(lines):
        with open(f"{root}/bad.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        return lambda: ImageList(root, "bad.txt", 3)
    one_line_error(write(["x/1.png 1", "", "x/2.png"]), f"{root}/bad.txt", "line 3")
    one_line_error(write(["x/1.png 1", "x/2.png two"]), "line 2")
    one_line_error(write(["x/1.png 1", "x/2.png 3"]), "line 2", "label 3", "[0, 2]")
    one_line_error(write(["x/1.png -1"]), "line 1", "label -1")
    one_line_error(write(["x/1.png 1", "x/9.png 0"]), "line 2", f"{root}/x/9.png")
    one_line_error(write([]), f"{root}/bad.txt")
    # A file that vanishes after parsing fails clearly when it is read.
    ds = ImageList(root, "ok.txt", 3)
    os.remove(f"{root}/x/2.png")
    one_line_error(lambda: ds[1], f"{root}/x/2.png")


def test_big_split_files_are_checked_by_sample(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_split_root(root, {"ok.txt": [("x/1.png", 0)]})
    monkeypatch.setattr(data_lt, "CHECK_ALL_UP_TO", 10)
    with open(f"{root}/big.txt", "w") as f:
        f.write("".join(f"x/missing_{i}.png 0\n" for i in range(1500)))
    one_line_error(lambda: ImageList(root, "big.txt", 1), "line 1", "missing_0.png")


def test_unknown_dataset():
    one_line_error(lambda: build_data("cifar1000-lt", "/tmp"), "cifar1000-lt", "cifar10-lt")


# --- CIFAR ----------------------------------------------------------------------------------------

class FakeCIFAR:
    """Stands in for torchvision's CIFAR10: balanced NHWC uint8 data, 10 classes x 30."""

    def __init__(self, root, train, download):
        n = 30 if train else 5
        self.data = np.random.RandomState(int(train)).randint(0, 256, (10 * n, 32, 32, 3), dtype=np.uint8)
        self.targets = np.random.RandomState(9).permutation(np.repeat(np.arange(10), n)).tolist()
        self.classes = [str(k) for k in range(10)]


def test_cifar_builds_a_tensor_lt_set(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    d = build_data("cifar10-lt", "/unused", imb_factor=10)
    fake = FakeCIFAR(None, True, False)
    keep = lt_indices(fake.targets, 10)
    assert d.kind == "tensor" and d.class_counts.tolist() == lt_counts(30, 10, 10)
    assert torch.equal(d.train.images, torch.from_numpy(fake.data[keep]).permute(0, 3, 1, 2))
    assert d.train.targets.tolist() == np.asarray(fake.targets)[keep].tolist()
    assert len(d.test) == 50 and d.val is None


def test_cifar_download_failure_is_one_line(monkeypatch):
    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    one_line_error(lambda: build_data("cifar100-lt", "/data/cifar"), "/data/cifar", "download")


def test_a_failed_cifar_download_leaves_no_empty_data_root(monkeypatch, tmp_path):
    """torchvision makes the data root before it downloads; when the download fails, a root this
    call made is removed (if empty), one that was there is kept."""
    def offline(root, train, download):
        os.makedirs(root, exist_ok=True)  # as torchvision's download does
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    one_line_error(lambda: build_data("cifar10-lt", str(tmp_path / "new" / "cifar")), "download")
    assert not (tmp_path / "new" / "cifar").exists()
    (tmp_path / "mine").mkdir()
    one_line_error(lambda: build_data("cifar10-lt", str(tmp_path / "mine")), "download")
    assert (tmp_path / "mine").is_dir()


# --- augmentation ---------------------------------------------------------------------------------

def reference_normalize(u8):
    return TF.normalize(TF.to_dtype(u8, torch.float32, scale=True), list(CIFAR_MEAN), list(CIFAR_STD))


def test_eval_pass_is_plain_normalisation():
    x = torch.randint(0, 256, (6, 3, 8, 12), dtype=torch.uint8)
    out = gpu_augment(x, CIFAR_MEAN, CIFAR_STD, train=False)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, reference_normalize(x), atol=1e-6, rtol=0)
    ds = TensorImages(x, torch.arange(6), CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(ds[4][0], out[4], atol=0, rtol=0)


def test_train_augment_matches_per_image_pad_crop_flip():
    x = torch.randint(0, 256, (64, 3, 8, 12), dtype=torch.uint8)  # non-square on purpose
    out = gpu_augment(x, CIFAR_MEAN, CIFAR_STD, train=True, generator=torch.Generator().manual_seed(5))
    dy, dx, flip = augment_draws(64, "cpu", torch.Generator().manual_seed(5))
    for i in range(64):
        img = TF.crop(TF.pad(x[i], [4], fill=0), int(dy[i]), int(dx[i]), 8, 12)
        if flip[i]:
            img = TF.horizontal_flip(img)
        torch.testing.assert_close(out[i], reference_normalize(img), atol=1e-6, rtol=0)


def test_augment_draws_cover_all_offsets_and_flips():
    dy, dx, flip = augment_draws(4000, "cpu", torch.Generator().manual_seed(0))
    for d in (dy, dx):
        counts = torch.bincount(d, minlength=9)
        assert len(counts) == 9 and counts.min() > 300  # 9 crop positions, each ~444 times
    assert 0.45 < flip.float().mean() < 0.55
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    aug = gpu_augment(x, CIFAR_MEAN, CIFAR_STD, train=True)
    same = (aug == gpu_augment(x, CIFAR_MEAN, CIFAR_STD, train=False)).flatten(1).all(1)
    assert same.float().mean() < 0.1  # unchanged only when dy=dx=4 and no flip (1/18)


def test_augment_is_deterministic_for_a_seeded_generator():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    run = lambda s: gpu_augment(x, CIFAR_MEAN, CIFAR_STD, train=True, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


# --- loaders --------------------------------------------------------------------------------------

def test_tensor_loader_batches_and_epochs():
    d = build_data("synthetic-lt", None, imb_factor=10)
    batches = [[0, 5, 9], [100, 2], list(range(300, 340))]
    loader = make_loader(d.train, batches, train=False, device="cpu")
    assert len(loader) == 3
    for _ in range(2):  # re-iterable
        got = list(loader)
        assert len(got) == 3
        for (x, y), idx in zip(got, batches):
            assert x.shape == (len(idx), 3, 32, 32) and y.dtype == torch.long
            assert y.tolist() == d.train.targets[idx].tolist()
            torch.testing.assert_close(x, torch.stack([d.train[i][0] for i in idx]), atol=0, rtol=0)
    sampler = BatchSampler(SequentialSampler(d.train), 128, drop_last=False)
    train_loader = make_loader(d.train, sampler, train=True, device="cpu", generator=torch.Generator().manual_seed(0))
    x, y = next(iter(train_loader))
    assert len(train_loader) == len(sampler) and x.shape == (128, 3, 32, 32)
    x_plain, y_plain = next(iter(make_loader(d.train, sampler, train=False, device="cpu")))
    assert torch.equal(y, y_plain) and not torch.equal(x, x_plain)  # same samples, augmented


def test_file_loader_uses_a_dataloader(tmp_path):
    root = str(tmp_path)
    write_split_root(root, {"l.txt": [(f"x/{i}.png", i % 3) for i in range(5)]})
    ds = ImageList(root, "l.txt", 3, data_lt.imagenet_transforms(False))
    batches = BatchSampler(SequentialSampler(ds), 2, drop_last=False)
    for workers in (0, 1):
        loader = make_loader(ds, batches, train=False, device="cpu", num_workers=workers)
        got = list(loader)
        assert len(loader) == 3 and [y.tolist() for _, y in got] == [[0, 1], [2, 0], [1]]
        assert got[0][0].shape == (2, 3, 224, 224)
        torch.testing.assert_close(got[2][0][0], ds[4][0])


# --- synthetic-lt ---------------------------------------------------------------------------------

def test_synthetic_lt_is_deterministic_long_tailed_and_learnable():
    a, b = build_data("synthetic-lt", None, seed=3), build_data("synthetic-lt", None, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, build_data("synthetic-lt", None, seed=4).test.images)
    assert a.class_counts.tolist() == lt_counts(200, 10, 100) and a.class_counts.sum() == len(a.train)
    assert all(m.any() for m in shot_masks(a.class_counts).values())
    assert np.bincount(a.test.targets.numpy()).tolist() == [50] * 10 and a.train.images.shape[1:] == (3, 32, 32)
    # Learnable but not trivial: class-mean templates from training beat chance (0.1) on test,
    # yet stay far from perfect.
    x, y = a.train.images.float().flatten(1), a.train.targets
    centroids = torch.stack([x[y == k].mean(0) for k in range(10)])
    pred = torch.cdist(a.test.images.float().flatten(1), centroids).argmin(1)
    acc = (pred == a.test.targets).float().mean()
    assert 0.25 < acc < 0.9, acc
