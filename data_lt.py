"""Long-tailed data sets and fast loaders for GBG.

Data sets (build_data's `dataset` argument):
  cifar10-lt, cifar100-lt  torchvision's CIFAR-10/100 python files under `root` (downloaded when
                           absent and allowed), cut to an exponential long tail (lt_counts): the
                           LDAM-DRW / BCL protocol, IF 100 keeps 12,406 / 10,847 training images.
                           The balanced 10,000-image test set is the test split.
  folder-lt                an ImageFolder tree root/train/<class>/* and root/test/<class>/*, class
                           folders sorted by name = labels, training part cut like CIFAR. Images of
                           at most 64 px (e.g. the CIFAR-10 JPEG copy) are decoded once into one
                           uint8 tensor; larger ones are read from disk with ImageNet transforms.
  imagenet-lt              1000 classes, split files ImageNet_LT_{train,val,test}.txt in `root`
                           (Liu et al. 2019, OLTR release). val is the model-selection split.
  inat2018                 8142 classes, split files iNaturalist18_{train,val}.txt in `root` (as
                           distributed with the Decoupling / BCL code bases). val is reported as
                           the test split, as in the literature; there is no separate val.
  synthetic-lt             10 classes of 3x32x32 textured colour images made in memory from the
                           seed (offline smoke tests and CI); `root` is ignored.

Split-file format: one image per line, `relative/path label`, the path relative to the data root
(--data-root), the label an integer in [0, num_classes). Blank lines are skipped.

Two kinds of data set come out of build_data:
  "tensor"  the whole split is one uint8 tensor [N,3,H,W] (TensorImages). Move it to the GPU once;
            make_loader then indexes batches there and augments them with gpu_augment, so no
            worker processes or per-image Python work are involved.
  "files"   ImageList over image files with torchvision transforms, loaded by a DataLoader.

BCL (--loss bcl) trains on three views per sample (bcl_views): make_loader(..., views=...) then
yields ([x_cls, x_con1, x_con2], y), each sample's views made on the CPU by SeededViews and seeded
by (epoch seed, sample index) alone, for either kind. For "tensor" data, views="device" makes the
same views batch by batch on the device (device_views), seeded by (epoch seed, sample index) too.
CE under --augment release (the authors' CIFAR view) trains on the classification view alone:
views=[bcl_views(...)[0]] in workers, or views="device-cls" on the device, batches ([x_cls], y).
"""
import atexit
import contextlib
import math
import multiprocessing.util  # noqa: F401 (its exit hook is registered before end_workers, which runs first)
import os
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

MANY, FEW = 100, 20  # Many: > 100 train images, Medium: 20..100, Few: < 20 (OLTR/BCL convention)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_IMAGE = 64      # folder-lt images up to this many pixels a side are held as one tensor
CHECK_ALL_UP_TO = 2000  # split files longer than this get a sampled existence check
PAD = 4               # CIFAR random-crop padding


class UserError(Exception):
    """What the user can fix (bad input, missing data, a diverging loss): one line naming the problem
    and the fix. train.py and slurm/submit.py print it without a traceback and exit with status 1."""

    def __init__(self, message=""):
        # A DataLoader worker's exception reaches the training process as type(e)("Caught UserError in
        # DataLoader worker process N.\nOriginal Traceback ...\ndata_lt.UserError: <message>"): keep the line
        text = str(message)
        if text.startswith("Caught UserError") and "Original Traceback" in text:
            text = text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
        super().__init__(text)


def _one_line(text):
    return " ".join(str(text).split())


# --- Long-tail profile ----------------------------------------------------------------------------

def lt_counts(n_max, num_classes, imb_factor):
    """Exponential profile n_k = int(n_max * IF^(-k/(K-1))), k in label order (Cui/Cao et al.)."""
    if imb_factor < 1:
        raise UserError(f"imbalance factor {imb_factor} is below 1; pass n_max/n_min, e.g. 100 (not 0.01)")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * imb_factor ** (-k / (num_classes - 1))) for k in range(num_classes)]


def lt_indices(targets, imb_factor, seed=0):
    """Indices of a long-tailed subset of a (balanced) labelled set, in class order.

    The draw reproduces the LDAM-DRW / BCL convention: np.random.seed(seed), then per class in
    label order np.random.shuffle(that class's indices) and keep the first n_k. A private
    RandomState seeded the same way gives the identical stream without touching global state.
    """
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets)
    n_keep = lt_counts(counts.max(), len(counts), imb_factor)
    rng = np.random.RandomState(seed)
    kept = []
    for k, n_k in enumerate(n_keep):
        idx = np.where(targets == k)[0]
        if len(idx) == 0:
            continue
        rng.shuffle(idx)
        kept.append(idx[:n_k])
    return np.concatenate(kept)


def shot_masks(class_counts):
    """Many (> 100 train images), Medium (20..100) and Few (< 20) class masks."""
    counts = np.asarray(class_counts)
    many, few = counts > MANY, counts < FEW
    return dict(many=many, medium=~many & ~few, few=few)


# --- Tensor data sets -----------------------------------------------------------------------------

def to_device(t, device):
    """t on `device` without making the host wait: a CPU tensor bound for a GPU is staged in pinned
    memory and copied with non_blocking=True (a copy from pageable memory waits for the device's
    queue to drain first); a copy to the CPU blocks. The same as gbg.to_device (this module imports
    nothing of the project)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=t.device.type == "cpu")  # from the host only


_CONSTANTS = {}


def constant(values, device, dtype=torch.float32):
    """torch.tensor(values) on `device`, made once per process and device: built per batch, each
    would be a copy from pageable host memory, which on a GPU waits for the device. Read-only."""
    key = (values, str(torch.device(device)), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = to_device(torch.tensor(values, dtype=dtype), device)
    return _CONSTANTS[key]


def normalize(images, mean, std):
    """uint8 [..., 3, H, W] -> float, (x/255 - mean)/std."""
    m = constant(tuple(mean), images.device).view(-1, 1, 1)
    s = constant(tuple(std), images.device).view(-1, 1, 1)
    return (images.float() / 255 - m) / s


class TensorImages(Dataset):
    """A whole split held as one uint8 tensor; items are normalised but never augmented."""

    def __init__(self, images, targets, mean, std):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise UserError(f"TensorImages wants uint8 images [N,3,H,W], got {images.dtype} {list(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long, device=images.device)
        if len(self.targets) != len(images):
            raise UserError(f"TensorImages got {len(images)} images but {len(self.targets)} targets")
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return normalize(self.images[i], self.mean, self.std), int(self.targets[i])

    def batch(self, index):
        """(normalised images, labels) of the samples `index` (a LongTensor on the data's device), in
        one gather: what gbg.class_gradients' fetch takes, with no per-sample label read."""
        return normalize(self.images[index], self.mean, self.std), self.targets[index]

    def to(self, device):
        return TensorImages(self.images.to(device), self.targets.to(device), self.mean, self.std)


def augment_draws(n, device, generator=None, pad=PAD):
    """Per-sample random-crop offsets (dy, dx in [0, 2*pad]) and horizontal-flip bits."""
    dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    flip = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
    return dy, dx, flip


def crop_flip(images, dy, dx, flip, pad=PAD):
    """Zero-pad by `pad`, take each sample's HxW window at (dy, dx), mirror where flip: batched."""
    B, C, H, W = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(H, device=dev)                  # [B, H]
    cols = dx[:, None] + torch.arange(W, device=dev)                  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirroring the window = flipping the crop
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def gpu_augment(images_uint8, mean, std, *, train, generator=None, draws=None):
    """CIFAR augmentation (4-px zero-pad random crop + flip) and normalisation on the images' device.
    `draws`: the (dy, dx, flip) of each image, when the caller fixes them (see make_loader's seed)."""
    x = images_uint8
    if train:
        x = crop_flip(x, *(draws if draws is not None else augment_draws(len(x), x.device, generator)))
    return normalize(x, mean, std)


# --- File data sets -------------------------------------------------------------------------------

def imagenet_transforms(train):
    crop = [v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()] if train else [v2.Resize(256), v2.CenterCrop(224)]
    return v2.Compose(crop + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_split(root, list_file, num_classes):
    """Parse a `relative/path label` split file into [(path, label, line_no)], validating it."""
    path = os.path.join(root, list_file)
    if not os.path.isfile(path):
        raise UserError(f"split file {path} not found; put it in the data root (--data-root {root})")
    samples = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not part of a path
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)  # rsplit keeps paths with spaces intact
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{path} line {line_no}: expected 'relative/path label', got {text[:80]!r}; "
                              f"fix the split file")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise UserError(f"{path} line {line_no}: label {label} outside [0, {num_classes - 1}]; "
                              f"fix the split file or the data set name")
            samples.append((parts[0], label, line_no))
    if not samples:
        raise UserError(f"split file {path} lists no images; regenerate it")
    # Stat-ing every file of a 437k-line list is slow on network disks: sample big lists.
    check = range(len(samples))
    if len(samples) > CHECK_ALL_UP_TO:
        check = [0] + sorted(np.random.RandomState(0).choice(len(samples), 1000, replace=False).tolist())
    for i in check:
        rel, _, line_no = samples[i]
        if not os.path.isfile(os.path.join(root, rel)):
            raise UserError(f"{path} line {line_no}: image {os.path.join(root, rel)} does not exist; "
                          f"check --data-root ({root}) and that the images are unpacked there")
    return samples


class ImageList(Dataset):
    """Images listed in a split file (paths relative to root), opened with PIL as RGB."""

    def __init__(self, root, list_file, num_classes, transform=None, *, samples=None):
        # samples: [(relative path, label, ...)] given directly instead of a list file (folder-lt)
        if samples is None:
            samples = read_split(root, list_file, num_classes)
        self.root, self.list_file, self.transform = root, list_file, transform
        self.paths = [s[0] for s in samples]
        self.targets = [int(s[1]) for s in samples]

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        """Image i as an RGB PIL image, untransformed."""
        path = os.path.join(self.root, self.paths[i])
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            listed = f" (listed in {self.list_file})" if self.list_file else ""
            raise UserError(f"image {path}{listed} does not exist; check --data-root ({self.root}) "
                          f"and that the images are unpacked there") from None
        except Exception as e:  # truncated or corrupt files: PIL raises OSError, SyntaxError, ValueError, ...
            raise UserError(f"cannot decode image {path} ({type(e).__name__}: {_one_line(e)[:120]}); replace "
                            f"or remove it") from None

    def __getitem__(self, i):
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


# --- build_data -----------------------------------------------------------------------------------

@dataclass
class LTData:
    train: Dataset          # training split (train transforms for "files"; raw uint8 for "tensor")
    train_eval: Dataset     # the SAME training samples with test transforms (for class gradients)
    val: Dataset | None     # model-selection split where one exists (ImageNet-LT val), else None
    test: Dataset           # the balanced test split
    num_classes: int
    class_counts: np.ndarray  # training count per class, int64[K]
    kind: str               # "tensor" (CIFAR-sized, held as one uint8 tensor) or "files"
    mean: tuple
    std: tuple
    class_names: list | None = None  # a name per class (CIFAR's, the class folders'), for groups.json and the log


def _tensor_data(train_x, train_y, test_x, test_y, num_classes):
    train = TensorImages(train_x, train_y, CIFAR_MEAN, CIFAR_STD)
    counts = np.bincount(train.targets.numpy(), minlength=num_classes).astype(np.int64)
    # TensorImages never augments (gpu_augment does, in make_loader), so one object serves both.
    return LTData(train=train, train_eval=train, val=None, test=TensorImages(test_x, test_y, CIFAR_MEAN, CIFAR_STD),
                  num_classes=num_classes, class_counts=counts, kind="tensor", mean=CIFAR_MEAN, std=CIFAR_STD)


def _files_data(root, train_samples, val, test_samples, num_classes, test_list=None):
    train = ImageList(root, None, num_classes, imagenet_transforms(True), samples=train_samples)
    train_eval = ImageList(root, None, num_classes, imagenet_transforms(False), samples=train_samples)
    test = ImageList(root, test_list, num_classes, imagenet_transforms(False), samples=test_samples)
    counts = np.bincount(train.targets, minlength=num_classes).astype(np.int64)
    return LTData(train=train, train_eval=train_eval, val=val, test=test, num_classes=num_classes,
                  class_counts=counts, kind="files", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _require_root(root):
    if not os.path.isdir(root):
        raise UserError(f"data root {root} does not exist; pass --data-root pointing at the data set folder")


def _cifar(name, root, imb_factor, seed):
    make = torchvision.datasets.CIFAR10 if name == "cifar10-lt" else torchvision.datasets.CIFAR100
    existed = os.path.exists(root)
    try:
        train, test = make(root, train=True, download=True), make(root, train=False, download=True)
    except Exception as e:  # no network, proxy, corrupt archive: all end the same way for the user
        if not existed:  # torchvision made the folder for the download: not left behind empty
            with contextlib.suppress(OSError):
                os.rmdir(root)
        raise UserError(f"{name}: CIFAR python files not found under {root} and download failed "
                      f"({type(e).__name__}: {_one_line(e)[:200]}); place the CIFAR python files there "
                      f"or allow downloads") from e
    keep = lt_indices(train.targets, imb_factor, seed)
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    data = _tensor_data(to_tensor(train.data[keep]), np.asarray(train.targets)[keep],
                        to_tensor(test.data), test.targets, len(train.classes))
    data.class_names = list(train.classes)
    return data


def _list_folder(split_dir, classes):
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(split_dir, c))
                       if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise UserError(f"class folder {os.path.join(split_dir, c)} holds no images; add images or remove the folder")
        paths += [os.path.join(os.path.basename(split_dir), c, f) for f in files]
        labels += [k] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _decode(root, paths):
    """Decode equally sized small images into one uint8 tensor [N,3,H,W]."""
    out = None
    for i, rel in enumerate(paths):
        path = os.path.join(root, rel)
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise UserError(f"cannot decode image {path} ({_one_line(e)[:120]}); replace or remove it") from e
        if out is None:
            out = np.empty((len(paths),) + a.shape, dtype=np.uint8)
        if a.shape != out.shape[1:]:
            raise UserError(f"image {path} is {a.shape[1]}x{a.shape[0]} but {os.path.join(root, paths[0])} is "
                          f"{out.shape[2]}x{out.shape[1]}; small folder-lt images are stacked into one tensor, "
                          f"so resize them to one size")
        out[i] = a
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _folder_lt(root, imb_factor, seed):
    _require_root(root)
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"folder-lt root {root} has no {split}/ folder; expected {root}/train/<class>/ "
                          f"and {root}/test/<class>/ image folders")
    list_classes = lambda d: sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
    classes = list_classes(os.path.join(root, "train"))
    if not classes:
        raise UserError(f"folder-lt: {os.path.join(root, 'train')} has no class folders; add one folder per class")
    test_classes = list_classes(os.path.join(root, "test"))
    if test_classes != classes:
        odd = sorted(set(classes) ^ set(test_classes))[:3]
        raise UserError(f"folder-lt: class folders of {root}/train and {root}/test differ (e.g. {odd}); "
                      f"use the same class folder names in both")
    train_paths, train_y = _list_folder(os.path.join(root, "train"), classes)
    test_paths, test_y = _list_folder(os.path.join(root, "test"), classes)
    keep = lt_indices(train_y, imb_factor, seed)
    train_paths, train_y = [train_paths[i] for i in keep], train_y[keep]
    first = os.path.join(root, train_paths[0])
    try:
        with Image.open(first) as im:
            small = max(im.size) <= SMALL_IMAGE  # reads the header only
    except Exception as e:
        raise UserError(f"cannot read image {first} ({_one_line(e)[:120]}); replace or remove it") from e
    if small:
        data = _tensor_data(_decode(root, train_paths), train_y, _decode(root, test_paths), test_y, len(classes))
    else:
        data = _files_data(root, list(zip(train_paths, train_y)), None, list(zip(test_paths, test_y)), len(classes))
    data.class_names = classes
    return data


def _split_files(root, train_file, val_file, test_file, num_classes):
    _require_root(root)
    train = read_split(root, train_file, num_classes)
    test = read_split(root, test_file, num_classes)
    val = None
    if val_file is not None:
        val = ImageList(root, val_file, num_classes, imagenet_transforms(False))
    data = _files_data(root, train, val, test, num_classes, test_list=test_file)
    data.class_names = folder_names(train + test, num_classes)
    return data


def folder_names(samples, num_classes):
    """A name per class of a split file: the folder of its first image (ImageNet's synset id, e.g.
    n01440764; iNaturalist's supercategory/id folders), or the label where no image shows one."""
    names = [None] * num_classes
    for path, label, *_ in samples:  # read_split's (path, label, line)
        if names[label] is None:
            parent = os.path.dirname(path)
            names[label] = os.path.basename(parent) or str(label)
    return [str(k) if n is None else n for k, n in enumerate(names)]


def synthetic_images(labels, rng, size=32):
    """Textured colour images: class k = colour pair k % 5 on a grating of orientation k // 2.

    Each colour and each orientation is shared by two classes, so neither alone identifies the
    class; per-sample phase (a random shift), frequency, angle, colour and contrast jitter plus
    pixel noise and a random occluding blob keep the task from being trivial.
    """
    palette = np.array([[[0.85, 0.25, 0.20], [0.20, 0.30, 0.80]],   # red / blue
                        [[0.20, 0.70, 0.30], [0.80, 0.75, 0.20]],   # green / yellow
                        [[0.60, 0.25, 0.70], [0.25, 0.70, 0.75]],   # purple / teal
                        [[0.90, 0.55, 0.15], [0.35, 0.35, 0.35]],   # orange / grey
                        [[0.95, 0.90, 0.85], [0.45, 0.25, 0.15]]])  # cream / brown
    n = len(labels)
    colour, orient = labels % 5, labels // 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    theta = orient * math.pi / 5 + rng.uniform(-0.15, 0.15, n)
    freq = rng.uniform(2.5, 4.0, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    wave = 0.5 + 0.5 * rng.uniform(0.4, 1.0, n)[:, None, None] * np.sin(
        2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])                  # [n,H,W]
    c0 = palette[colour, 0] + rng.normal(0, 0.08, (n, 3))
    c1 = palette[colour, 1] + rng.normal(0, 0.08, (n, 3))
    img = wave[:, None] * c0[:, :, None, None] + (1 - wave[:, None]) * c1[:, :, None, None]  # [n,3,H,W]
    # An occluding blob of random colour hides part of the texture.
    cy, cx = rng.uniform(0, 1, (2, n))
    r = rng.uniform(0.1, 0.3, n)
    blob = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) < r[:, None, None] ** 2
    img = np.where(blob[:, None], rng.uniform(0, 1, (n, 3))[:, :, None, None], img)
    img = img + rng.normal(0, 0.12, img.shape)
    return torch.from_numpy(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


def _synthetic(imb_factor, seed, num_classes=10, n_max=200, n_test=50):
    rng = np.random.RandomState(seed)
    train_y = np.repeat(np.arange(num_classes), lt_counts(n_max, num_classes, imb_factor))
    test_y = np.repeat(np.arange(num_classes), n_test)
    data = _tensor_data(synthetic_images(train_y, rng), train_y, synthetic_images(test_y, rng), test_y, num_classes)
    data.class_names = synthetic_names(num_classes)
    return data


SYNTHETIC_COLOURS = ("red-blue", "green-yellow", "purple-teal", "orange-grey", "cream-brown")


def synthetic_names(num_classes):
    """synthetic_images' classes by what tells them apart: the colour pair and the grating's angle."""
    return [f"{SYNTHETIC_COLOURS[k % 5]}-{k // 2 * 36}deg" for k in range(num_classes)]


DATASETS = ("cifar10-lt", "cifar100-lt", "imagenet-lt", "inat2018", "folder-lt", "synthetic-lt")


def build_data(dataset, root, *, imb_factor=100, seed=0):
    """The training / evaluation splits of one long-tailed data set (see the module docstring)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    lt_counts(1, 2, imb_factor)  # validates imb_factor before any slow work
    if dataset in ("cifar10-lt", "cifar100-lt"):
        return _cifar(dataset, root, imb_factor, seed)
    if dataset == "folder-lt":
        return _folder_lt(root, imb_factor, seed)
    if dataset == "synthetic-lt":
        return _synthetic(imb_factor, seed)
    if dataset == "imagenet-lt":
        return _split_files(root, "ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt", 1000)
    return _split_files(root, "iNaturalist18_train.txt", None, "iNaturalist18_val.txt", 8142)


# --- BCL views ------------------------------------------------------------------------------------
# Balanced Contrastive Learning (Zhu et al. 2022) trains on three views of every sample: one for
# the classifier and two for the contrastive loss. Sources (line numbers approximate):
#   CIFAR-sized images, WickyLee1998/GBG_v1 @681e276 cifar_Group_full.py: classification view
#   RandomCrop(32, pad 4) + flip + AutoAugment CIFAR policy + Cutout 16 px (l.168-176); contrastive
#   views RandomResizedCrop scale (0.2, 1), jitter p 0.8, grayscale p 0.2, no blur (l.178-188).
#   ImageNet-LT / iNat, FlamieZhu/Balanced-Contrastive-Learning @f72d070 main.py l.151-181:
#   RandomResizedCrop (0.08, 1) + flip + jitter + timm's RandAugment "rand-n2-m10-mstd0.5"
#   (l.157) for the classification view, SimCLR-style crop, jitter and grayscale for the other two.

CUTOUT = 16  # side of the Cutout square on 32-px images (DeVries & Taylor 2017)
CONTRAST_SCALE = (0.2, 1.0)  # RandomResizedCrop scale of CIFAR-sized contrastive views (GBG_v1 l.179)
# timm's RandAugment, as BCL uses it (randaugment.py l.24, l.286-310): magnitude 10 on a 0..10 scale
# (_MAX_LEVEL = 10), i.e. full strength, and each of the 2 ops applied with probability 0.5.
# torchvision's v2.RandAugment spreads magnitude over num_magnitude_bins (default 31, where 10 is a
# third of full strength): 11 bins make 10 the last. The 0.5 is RandomApply around one op at a time.
RANDAUG_OPS, RANDAUG_MAGNITUDE, RANDAUG_BINS, RANDAUG_P = 2, 10, 11, 0.5


def rand_augment():
    """timm's "rand-n2-m10" with torchvision ops (no magnitude noise, see README)."""
    one = v2.RandAugment(num_ops=1, magnitude=RANDAUG_MAGNITUDE, num_magnitude_bins=RANDAUG_BINS)
    return v2.Compose([v2.RandomApply([one], p=RANDAUG_P) for _ in range(RANDAUG_OPS)])


def cutout(x, length=CUTOUT):
    """Zero one length x length square (clipped at the border) of a normalised [C,H,W] image, i.e.
    paint it with the mean colour. Its centre comes from torch's global RNG, like v2's draws."""
    H, W = x.shape[-2:]
    cy, cx = torch.randint(0, H, ()).item(), torch.randint(0, W, ()).item()
    x = x.clone()
    x[..., max(cy - length // 2, 0):cy + length // 2, max(cx - length // 2, 0):cx + length // 2] = 0
    return x


def bcl_views(kind, mean, std, size):
    """[classification view, contrastive view, contrastive view]: torchvision v2 pipelines that
    return normalised float32 [3,h,w] tensors of h x w = `size` (an int or (h, w)).

    kind "tensor": uint8 [3,H,W] tensors, CIFAR-sized (pass size=(H, W)); "files": PIL images
    (ImageNet-LT, iNat; size 224). Every draw comes from torch's global RNG (see SeededViews).
    """
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    jitter = v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    if kind == "tensor":
        cls = v2.Compose([v2.RandomCrop(size, padding=PAD), v2.RandomHorizontalFlip(),
                          v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), *to_float, cutout])
        sim = v2.Compose([v2.RandomResizedCrop(size, scale=CONTRAST_SCALE), v2.RandomHorizontalFlip(), jitter,
                          v2.RandomGrayscale(0.2), *to_float])
    elif kind == "files":
        cls = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0)), v2.RandomHorizontalFlip(),
                          v2.ColorJitter(0.4, 0.4, 0.4, 0.0), rand_augment(),
                          v2.ToImage(), *to_float])
        sim = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), jitter, v2.RandomGrayscale(0.2),
                          v2.ToImage(), *to_float])
    else:
        raise UserError(f"bcl_views: unknown data kind {kind!r}; expected 'tensor' or 'files'")
    return [cls, sim, sim]


def sample_seed(seed, index):
    """A 63-bit seed for one sample of one epoch: SeedSequence mixes (seed, index), so nearby
    indices get unrelated streams."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededViews(Dataset):
    """Sample i -> ([view(image i) for view in views], label).

    With a seed, torch's global RNG is set to sample_seed(seed, i) for the draws of sample i (and
    put back afterwards), so a sample's views depend on (seed, i) alone: not on its batch, its
    worker, its process or what ran before. Resumed and multi-process runs then see exactly the
    views of an uninterrupted single-process run. Without a seed, the draws are unseeded.
    """

    def __init__(self, ds, views, seed=None):
        if not isinstance(ds, (TensorImages, ImageList)):
            raise UserError(f"SeededViews takes TensorImages or ImageList, got {type(ds).__name__}")
        self.ds, self.views, self.seed = ds, list(views), seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img = self.ds.images[i] if isinstance(self.ds, TensorImages) else self.ds.load(i)
        label = int(self.ds.targets[i])
        if self.seed is None:
            return [view(img) for view in self.views], label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, i))
            return [view(img) for view in self.views], label


# --- BCL views on the device ----------------------------------------------------------------------
# The same three views as bcl_views("tensor", ...), made for a whole batch of uint8 [B,3,H,W] images
# on their device (device_views): no worker processes, no per-image Python work, so a GPU run is
# not bounded by the CPU. Each sample's random draws are a counter-based hash (SplitMix64, Steele
# et al. 2014) of (seed, view, sample index, draw number) computed on int64 tensors, so a view
# depends on (seed, index) alone: not on the batch, its order, the process or what ran before
# (resume and several processes then see the views of one uninterrupted process). The draws follow
# torchvision's v2 transforms one for one (same distributions, same order of operations, uint8
# rounding after each colour op); the transforms themselves are batched with per-sample parameters.

def _i64(c):
    """A Python integer as the int64 with the same 64 low bits."""
    c %= 1 << 64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x, s):
    """Logical right shift of int64 tensors (>> is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x):
    """SplitMix64's output function on int64 tensors (uint64 arithmetic: products wrap mod 2^64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def view_uniforms(seed, view, index, n):
    """[B, n] float64 uniforms in [0, 1) for view `view` of the samples `index` [B] (int64, on their
    device): draw k of sample i is a function of (seed, view, i, k) only (53 random bits each)."""
    key = splitmix64(torch.full_like(index, _i64(int(seed) + 0x9E3779B97F4A7C15 * (view + 1))))
    key = splitmix64(key + index * _GOLDEN)
    k = torch.arange(1, n + 1, dtype=torch.long, device=index.device)
    return _shr(splitmix64(key[:, None] + k * _GOLDEN), 11).double() * 2.0 ** -53


def _randint(u, n):
    """torch.randint(0, n) from a uniform u: floor(u * n), n a number or a tensor."""
    return torch.minimum((u * n).floor().long(), torch.as_tensor(n, device=u.device) - 1)


# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019), as torchvision's v2.AutoAugment holds it
# (_auto_augment.py, AutoAugmentPolicy.CIFAR10): 25 sub-policies of two (op, probability, magnitude
# bin); the magnitudes over 10 bins, signed ops negated with probability 0.5 (the same file's
# _AUGMENTATION_SPACE). tests/test_device_views.py checks both tables against torchvision's.
AA_CIFAR10 = [
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
]
AA_BINS = 10


def aa_magnitude(op, bin_, H, W):
    """(magnitude of bin `bin_`, signed?) of one AutoAugment op on H x W images."""
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * W, "TranslateY": 150.0 / 331.0 * H,
           "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:
        return float(torch.linspace(0.0, top[op], AA_BINS)[bin_]), True
    if op == "Posterize":
        return float((8 - (torch.arange(AA_BINS) / ((AA_BINS - 1) / 4))).round().int()[bin_]), False
    if op == "Solarize":
        return float(torch.linspace(1.0, 0.0, AA_BINS)[bin_]), False
    return 0.0, False  # AutoContrast, Equalize, Invert


_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_PIXEL_MAPS = {}


def _geometric(x, op, m):
    """A geometric AutoAugment op (_GEOMETRIC) on uint8 images [..., H, W], as one gather. With nearest
    sampling and fill 0 every output pixel copies one input pixel or is 0, so the op is a map from output to
    input pixels: found once per (op, magnitude, size, device) by running torchvision's op on an image of
    pixel numbers, it gives torchvision's result exactly. torchvision builds its sampling grid from
    Python numbers on every call (torch.tensor(..., device=...)), each a copy that waits for a GPU."""
    H, W = x.shape[-2:]
    key = (op, m, H, W, str(x.device))
    if key not in _PIXEL_MAPS:
        numbers = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W)  # 0: outside the image
        _PIXEL_MAPS[key] = to_device(_torchvision_geometric(numbers, op, m).round().long().view(-1), x.device)
    padded = torch.cat([x.new_zeros(*x.shape[:-2], 1), x.flatten(-2)], -1)  # position 0 holds the fill
    return padded[..., _PIXEL_MAPS[key]].view(x.shape)


def _torchvision_geometric(x, op, m):
    near = v2.InterpolationMode.NEAREST
    if op == "ShearX":
        return v2.functional.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
                                    interpolation=near, fill=None, center=[0, 0])
    if op == "ShearY":
        return v2.functional.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
                                    interpolation=near, fill=None, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        t = [int(m), 0] if op == "TranslateX" else [0, int(m)]
        return v2.functional.affine(x, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=near,
                                    fill=None)
    return v2.functional.rotate(x, angle=m, interpolation=near, fill=None)


def _sharpness(x, factor):
    """v2.functional.adjust_sharpness of uint8 images [B,3,H,W] (torchvision's adjust_sharpness_image
    step by step), with its 3x3 kernel made once (torchvision copies it from the host every call)."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    kernel = constant(((1 / 13, 1 / 13, 1 / 13), (1 / 13, 5 / 13, 1 / 13), (1 / 13, 1 / 13, 1 / 13)), x.device)
    out = x.to(torch.float32, copy=True)
    blurred = F.conv2d(out, kernel.expand(x.shape[-3], 1, 3, 3), groups=x.shape[-3]).round_()
    view = out[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def _autocontrast(x):
    """v2.functional.autocontrast of uint8 images (torchvision's autocontrast_image), with torch.where
    in place of its boolean-mask assignments (each a nonzero(), which waits for a GPU)."""
    img = x.to(torch.float32)
    low, high = img.amin(dim=(-2, -1), keepdim=True), img.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return img.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


def aa_op(x, op, m):
    """One AutoAugment op on a batch of uint8 images, as v2.AutoAugment applies it (nearest, fill 0)."""
    if op in _GEOMETRIC:
        return _geometric(x, op, m)
    if op == "Sharpness":
        return _sharpness(x, 1.0 + m)
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Brightness":
        return v2.functional.adjust_brightness(x, 1.0 + m)
    if op == "Color":
        return v2.functional.adjust_saturation(x, 1.0 + m)
    if op == "Contrast":
        return v2.functional.adjust_contrast(x, 1.0 + m)
    if op == "Posterize":
        return v2.functional.posterize(x, bits=int(m))
    if op == "Solarize":
        return v2.functional.solarize(x, threshold=255.0 * m)
    if op == "Equalize":
        return v2.functional.equalize(x)
    if op == "Invert":
        return v2.functional.invert(x)
    raise ValueError(f"unknown AutoAugment op {op}")


def cls_view_params(seed, index, H, W):
    """Per-sample draws of the classification view (view 0), in v2's order: RandomCrop(pad 4) offsets,
    flip, AutoAugment (sub-policy, then per op: applied?, negated?), Cutout centre."""
    u = view_uniforms(seed, 0, index, 10)
    return dict(dy=_randint(u[:, 0], 2 * PAD + 1), dx=_randint(u[:, 1], 2 * PAD + 1), flip=u[:, 2] < 0.5,
                policy=_randint(u[:, 3], len(AA_CIFAR10)),
                apply=torch.stack([u[:, 4], u[:, 6]], 1), negate=torch.stack([u[:, 5], u[:, 7]], 1) <= 0.5,
                cy=_randint(u[:, 8], H), cx=_randint(u[:, 9], W))


def sim_view_params(seed, view, index, H, W, scale=CONTRAST_SCALE, ratio=(3 / 4, 4 / 3)):
    """Per-sample draws of a contrastive view (views 1 and 2), as v2's RandomResizedCrop (10 tries of
    area and log-aspect, the first crop that fits, else the centre fallback), flip, RandomApply(p 0.8)
    of ColorJitter(0.4, 0.4, 0.4, 0.1) (factors, random order) and RandomGrayscale(0.2) draw them."""
    u = view_uniforms(seed, view, index, 33)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, 10:20])
    # torch.round rounds half to even, as Python's round() in v2
    w, h = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    if W / H < ratio[0]:  # v2's fallback, a centred crop of the nearest allowed aspect ratio
        fw, fh = W, int(round(W / ratio[0]))
    elif W / H > ratio[1]:
        fw, fh = int(round(H * ratio[1])), H
    else:
        fw, fh = W, H
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, _randint(u[:, 20], H - h + 1), (H - h) // 2)
    left = torch.where(found, _randint(u[:, 21], W - w + 1), (W - w) // 2)
    f = lambda v, lo, hi: (lo + (hi - lo) * v).float()  # v2 draws the factors in float32
    return dict(top=top, left=left, h=h, w=w, flip=u[:, 22] < 0.5, jitter=u[:, 23] < 0.8,
                factors=torch.stack([f(u[:, 24], 0.6, 1.4), f(u[:, 25], 0.6, 1.4), f(u[:, 26], 0.6, 1.4),
                                     f(u[:, 27], -0.1, 0.1)], 1),
                order=u[:, 28:32].argsort(1),  # a uniform random permutation of the four jitter ops
                gray=u[:, 32] < 0.2)


def resized_crop(images, top, left, h, w, flip, size):
    """Each sample's h x w window at (top, left), bilinearly resized to `size` (half-pixel centres,
    align_corners=False, as torchvision's resize; antialiasing does nothing when enlarging, and the
    crops here never exceed the image) and mirrored where flip. uint8 in, uint8 out (rounded)."""
    B, C, H, W = images.shape
    dev = images.device

    def axis(start, length, n):  # source rows (or columns) and weights of n outputs, per sample
        src = ((torch.arange(n, device=dev) + 0.5)[None] * (length[:, None] / n) - 0.5).clamp(min=0)
        lo = src.floor().long()
        hi = torch.minimum(lo + 1, length[:, None] - 1)
        return start[:, None] + lo, start[:, None] + hi, (src - lo).float()

    y0, y1, wy = axis(top, h, size[0])
    x0, x1, wx = axis(left, w, size[1])
    x0, x1, wx = (torch.where(flip[:, None], t.flip(1), t) for t in (x0, x1, wx))
    img = images.float()
    cols = lambda i: img.gather(3, i[:, None, None, :].expand(B, C, H, size[1]))        # [B,C,H,w_out]
    img = cols(x0) * (1 - wx)[:, None, None, :] + cols(x1) * wx[:, None, None, :]      # each row, then
    rows = lambda i: img.gather(2, i[:, None, :, None].expand(B, C, size[0], size[1]))  # the rows
    wy = wy[:, None, :, None]
    return (rows(y0) * (1 - wy) + rows(y1) * wy).round_().to(torch.uint8)


def _gray(x):
    """v2's luma (0.2989 R + 0.587 G + 0.114 B) of uint8 images, floored, in float32 [B,1,H,W]."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _blend(x, other, ratio):
    """v2's _blend with one ratio per sample [B,1,1,1]: ratio x + (1 - ratio) other, clamped, to uint8.
    addcmul rounds like v2's add_(other, alpha=1 - ratio) (one fused multiply-add where the CPU has it)."""
    return torch.addcmul(x.mul(ratio), other, (1.0 - ratio.double()).float()).clamp_(0, 255).to(torch.uint8)


def _rgb_to_hsv(x):
    """torchvision's _rgb_to_hsv (v2/functional/_color.py), float RGB in [0, 1] -> HSV."""
    r, g, _ = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    eqc = maxc == minc
    crange = maxc - minc
    ones = torch.ones_like(maxc)
    s = crange / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / torch.where(eqc, ones, crange).unsqueeze(-3)).unbind(dim=-3)
    neq_r, eq_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(eq_g & neq_r)
    hr = bc.sub_(gc).mul_(~neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(neq_r.logical_and_(eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(x):
    """torchvision's _hsv_to_rgb (v2/functional/_color.py)."""
    h, s, v = x.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int32).remainder_(6)
    sxf, one_minus_s = s * f, 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = constant(((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2)), x.device, torch.long)
    return vpqt.gather(-3, select[:, i].moveaxis(0, -3))


def jitter_op(x, op, factor):
    """ColorJitter's op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) on uint8 images [B,3,H,W]
    with one factor per sample [B], as v2's adjust_* kernels compute it on uint8 images."""
    f = factor.view(-1, 1, 1, 1)
    if op == 0:
        return x.mul(f).clamp_(0, 255).to(torch.uint8)
    if op == 1:
        return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    if op == 2:
        return _blend(x, _gray(x), f)
    hsv = _rgb_to_hsv(x.float().mul_(1.0 / 255))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3)).mul_(256.0 - 1e-3).to(torch.uint8)


def _normalize_v2(x, mean, std):
    """v2.ToDtype(float32, scale=True) then v2.Normalize(mean, std), batched."""
    m = constant(tuple(mean), x.device).view(-1, 1, 1)
    s = constant(tuple(std), x.device).view(-1, 1, 1)
    return x.float().mul_(1.0 / 255).sub_(m).div_(s)


def _on(x, sel, fn):
    """x with fn applied to the samples where sel (a bool [B] on the host) holds; fn takes and
    returns a batch (and gets the samples' positions). The grouping is read on the host, where the
    draws are made, so a GPU never waits for it (nonzero() on the device would sync every group)."""
    idx = sel.nonzero()[:, 0]
    if len(idx):
        idx = to_device(idx, x.device)
        x = x.index_copy(0, idx, fn(x[idx], idx))
    return x


def cls_view(images, p, mean, std):
    """The classification view from cls_view_params' draws: pad-4 crop + flip, AutoAugment CIFAR-10
    (samples grouped by sub-policy and sign, one torchvision call per group), normalise, Cutout 16."""
    H, W = images.shape[-2:]
    d = {k: to_device(p[k], images.device) for k in ("dy", "dx", "flip", "cy", "cx")}
    x = crop_flip(images, d["dy"], d["dx"], d["flip"])
    for stage in range(2):
        for k, sub in enumerate(AA_CIFAR10):
            op, prob, bin_ = sub[stage]
            m, signed = aa_magnitude(op, bin_, H, W) if bin_ is not None else (0.0, False)
            chosen = (p["policy"] == k) & (p["apply"][:, stage] <= prob)  # v2: applied when rand() <= p
            for sign in ((False, True) if signed else (False,)):
                sel = chosen & (p["negate"][:, stage] == sign) if signed else chosen
                x = _on(x, sel, lambda xs, _, op=op, m=-m if sign else m: aa_op(xs, op, m))
    x = _normalize_v2(x, mean, std)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    half = CUTOUT // 2  # the square [c - 8, c + 8) of cutout(), clipped at the border
    inside = lambda c, r: (r[None] >= c[:, None] - half) & (r[None] < c[:, None] + half)
    hole = inside(d["cy"], rows)[:, :, None] & inside(d["cx"], cols)[:, None, :]
    return x.masked_fill(hole[:, None], 0.0)


def sim_view(images, p, mean, std):
    """A contrastive view from sim_view_params' draws: resized crop + flip, ColorJitter where drawn
    (each sample's four ops in its own random order, uint8 between ops as in v2), grayscale, normalise."""
    d = {k: to_device(p[k], images.device) for k in ("top", "left", "h", "w", "flip", "factors")}
    x = resized_crop(images, d["top"], d["left"], d["h"], d["w"], d["flip"], tuple(images.shape[-2:]))
    for step in range(4):
        for op in range(4):
            sel = p["jitter"] & (p["order"][:, step] == op)
            x = _on(x, sel, lambda xs, idx, op=op: jitter_op(xs, op, d["factors"][idx, op]))
    x = _on(x, p["gray"], lambda xs, _: _gray_trunc(xs))
    return _normalize_v2(x, mean, std)


def _gray_trunc(x):
    """v2.functional.rgb_to_grayscale(x, 3) of uint8 images (the luma truncated to uint8)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).to(torch.uint8).unsqueeze(-3).expand(x.shape)


def device_views(images, index, seed, mean, std, n_views=3):
    """[classification view, contrastive view, contrastive view] of uint8 images [B,3,H,W] whose
    sample indices are `index` [B]: bcl_views("tensor", ...)'s transforms, batched on the images'
    device, each sample's draws a function of (seed, index) alone (see the section comment).
    The draws (a few dozen numbers per sample) are made on the host from `index` (a list or a CPU
    tensor, as the batch sampler gives it) and copied to the device without waiting.
    n_views=1: the classification view alone (the same as the first of three)."""
    index = torch.as_tensor(index, dtype=torch.long, device="cpu")
    H, W = images.shape[-2:]
    cls = cls_view(images, cls_view_params(seed, index, H, W), mean, std)
    if n_views == 1:
        return [cls]
    return [cls,
            sim_view(images, sim_view_params(seed, 1, index, H, W), mean, std),
            sim_view(images, sim_view_params(seed, 2, index, H, W), mean, std)]


# --- Loaders --------------------------------------------------------------------------------------

def worker_init(worker_id):
    """worker_init_fn of every DataLoader here: the workers leave SIGUSR2 and SIGTERM to the
    training process. SLURM signals every process of a job step before a time limit or a
    preemption, and forked workers inherit the task's handlers (submitit's checkpoint-and-requeue
    on USR2): several processes then checkpoint and requeue at once, and a worker that exits makes
    the task's loader fail. Ignored here, the task decides; a worker still ends with its parent.
    (PyTorch already ignores SIGINT in workers, for the same reason.)"""
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def end_workers():
    """At exit, kill the DataLoader workers that still run. multiprocessing ends a process's daemonic
    children at exit with SIGTERM, which they ignore (worker_init), and then waits for them: after an
    error raised while a loader was being read (in a worker, or in the training step) the process
    would wait forever, holding its GPUs. Loaders read to their end have stopped their workers."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers and threading.current_thread() is threading.main_thread():
        # PyTorch's SIGCHLD handler would report each killed worker as a failure (a traceback after the
        # run's own one-line error); the process is ending, so nothing is left for it to report
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()


atexit.register(end_workers)  # atexit runs last-registered first: before multiprocessing's own hook


DEVICE_VIEWS = {"device": 3, "device-cls": 1}  # make_loader's views made on the device: how many of device_views'


class Loader:
    """Re-iterable batches: each iter() is one epoch; len() is the number of batches."""

    def __init__(self, epoch, length):
        self.epoch, self.length = epoch, length

    def __iter__(self):
        return self.epoch()

    def __len__(self):
        return self.length()


def make_loader(ds, batch_sampler, *, train, device, num_workers=4, generator=None, seed=None, views=None):
    """(x float, y long) batches on `device` for the index lists that batch_sampler yields.

    TensorImages: batches are gathered and augmented on the device (moved there once if needed).
    With `seed`, each SAMPLE's crop and flip are drawn up front from that seed, so they do not
    depend on which batch or process the sample lands in: resumed and multi-process runs then
    see exactly the images of an uninterrupted single-process run.
    Anything else: a DataLoader with worker processes, copied to the device without blocking; for
    training image files (ImageList) with `seed`, each sample's transform is seeded by (seed, index)
    (SeededViews), so that the images do not depend on the workers either.
    views (training only; e.g. bcl_views): batches are ([x_view1, x_view2, ...], y), each view
    made per sample on the CPU (DataLoader workers) by SeededViews, seeded by (seed, index).
    views="device" (TensorImages only): the BCL views made batch by batch on `device` by
    device_views, seeded by (seed, index) too; no worker processes. views="device-cls": the
    classification view alone, as a list of one ([x_cls], y): CE under --augment release.
    """
    device = torch.device(device)
    if isinstance(views, str) and train:
        if views not in DEVICE_VIEWS or not isinstance(ds, TensorImages):
            raise UserError(f"make_loader: views={views!r} needs views='device' or 'device-cls' and images held as "
                            f"one tensor (CIFAR-sized data), got {type(ds).__name__}; pass torchvision pipelines "
                            f"(bcl_views)")
        n_views = DEVICE_VIEWS[views]
        ds = ds.to(device) if ds.images.device != device else ds
        view_seed = int(torch.randint(0, 2 ** 62, ())) if seed is None else seed

        def device_epoch():
            for idx in batch_sampler:
                cpu_idx = torch.as_tensor(idx, dtype=torch.long)
                idx = to_device(cpu_idx, device)
                yield device_views(ds.images[idx], cpu_idx, view_seed, ds.mean, ds.std, n_views), ds.targets[idx]
        return Loader(device_epoch, lambda: len(batch_sampler))
    if views is not None and train:
        base = ds.to("cpu") if isinstance(ds, TensorImages) else ds
        view_loader = DataLoader(SeededViews(base, views, seed), batch_sampler=batch_sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", worker_init_fn=worker_init)

        def view_epoch():
            for xs, y in view_loader:
                yield [x.to(device, non_blocking=True) for x in xs], y.to(device, non_blocking=True)
        return Loader(view_epoch, lambda: len(view_loader))
    if isinstance(ds, TensorImages):
        if ds.images.device != device:
            ds = ds.to(device)
        if generator is not None and generator.device.type != device.type:
            raise UserError(f"make_loader: generator is on {generator.device} but the batches are made on {device}; "
                          f"pass torch.Generator(device={str(device)!r})")

        def epoch():
            table = None
            if train and seed is not None:
                draws = augment_draws(len(ds), "cpu", torch.Generator().manual_seed(seed))
                table = [to_device(t, device) for t in draws]
            for idx in batch_sampler:
                idx = to_device(torch.as_tensor(idx, dtype=torch.long), device)
                draws = None if table is None else [t[idx] for t in table]
                yield (gpu_augment(ds.images[idx], ds.mean, ds.std, train=train, generator=generator, draws=draws),
                       ds.targets[idx])
        return Loader(epoch, lambda: len(batch_sampler))

    if train and seed is not None and isinstance(ds, ImageList) and ds.transform is not None:
        # Image files (ImageNet-LT, iNat, folder-lt above 64 px): each sample's crop and flip drawn
        # from (seed, index) alone, as the BCL views, not from the RNG of whichever worker loads it,
        # so that --workers, resuming and the number of processes leave the run as it is.
        seeded = DataLoader(SeededViews(ds, [ds.transform], seed), batch_sampler=batch_sampler,
                            num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init)

        def seeded_epoch():
            for (x,), y in seeded:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return Loader(seeded_epoch, lambda: len(seeded))
    cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
    # Workers end with each pass (no persistent_workers): a rank's training, validation and test
    # loaders then never hold --workers idle processes each at once, only the one in use does.
    loader = DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=cpu_generator, worker_init_fn=worker_init)

    def epoch():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return Loader(epoch, lambda: len(loader))
