"""gbg.py as a user copies it: the usage example of its docstring runs verbatim, and what one
function returns the next accepts (groups as a numpy array or a tensor give the same results)."""

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gbg

torch.set_num_threads(1)

COUNTS = [40, 30, 20, 14, 10, 7, 5, 4]  # long-tailed, 8 classes
K = len(COUNTS)


def usage_example():
    """The indented block after the line "Usage::" of gbg's docstring, dedented."""
    lines = gbg.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Usage::") + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip("\n")


class Net(nn.Module):
    """A tiny CNN with BatchNorm (what the default BatchNorm recalibration acts on) and `fc`."""

    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([k for k, c in enumerate(COUNTS) for _ in range(c)])
    centres = torch.randn(K, 1, 4, 4, generator=g)
    x = centres[labels] + 0.5 * torch.randn(len(labels), 1, 4, 4, generator=g)
    return torch.utils.data.TensorDataset(x, labels), labels


class Augmented(torch.utils.data.Dataset):
    """The training view: each sample with fresh noise on every read (what augmentation does)."""

    def __init__(self, plain):
        self.plain = plain

    def __len__(self):
        return len(self.plain)

    def __getitem__(self, i):
        x, y = self.plain[i]
        return x + 0.1 * torch.randn_like(x), y


def mean_loss(model, dataset):
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


def test_usage_example_is_short_and_runs_verbatim():
    code = usage_example()
    statements = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert 10 <= len(statements) <= 18, code  # short enough to copy at a glance
    torch.manual_seed(0)
    plain, labels = make_data()
    model = Net(K)
    before = [p.detach().clone() for p in model.parameters()]
    grouped_on = []
    real_class_gradients = gbg.class_gradients

    def class_gradients(model, dataset, *args, **kwargs):
        grouped_on.append(dataset)
        return real_class_gradients(model, dataset, *args, **kwargs)

    names = dict(model=model, dataset=Augmented(plain), plain_dataset=plain, labels=labels, num_classes=K,
                 batch_size=32, warmup_epochs=1, epochs=4,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    loss_before = mean_loss(model, plain)
    gbg.class_gradients = class_gradients
    try:
        exec(compile(code, "gbg.__doc__ (Usage)", "exec"), names)
    finally:
        gbg.class_gradients = real_class_gradients
    assert grouped_on == [plain]  # the groups come from the un-augmented samples, as train.py's
    groups, step = names["groups"], names["step"]
    assert groups.shape == (K,) and sorted(set(groups.tolist())) == list(range(names["num_groups"]))
    alpha = step["alpha"]
    assert alpha.shape == (names["num_groups"],)  # GAC: every group in every batch
    assert (alpha >= 0).all() and float(alpha.sum()) == pytest.approx(1.0, abs=1e-9)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert mean_loss(model, plain) < 0.8 * loss_before


# ---- class_gradients' default is the trainer's: BatchNorm recalibrated ----------------------

def test_class_gradients_recalibrates_batchnorm_by_default():
    torch.manual_seed(0)
    dataset, _ = make_data()
    model = Net(K)
    backbone = list(model.features.parameters())
    default = gbg.class_gradients(model, dataset, K, backbone)
    assert torch.equal(default, gbg.class_gradients(model, dataset, K, backbone, recalibrate_bn=True))
    assert not torch.allclose(default, gbg.class_gradients(model, dataset, K, backbone, recalibrate_bn=False))


# ---- groups flow from ncut_groups to every function that takes them -------------------------

@pytest.fixture(scope="module")
def grouped():
    torch.manual_seed(1)
    dataset, labels = make_data(seed=1)
    model = Net(K)
    grads = gbg.class_gradients(model, dataset, K, list(model.features.parameters()))
    groups = gbg.ncut_groups(gbg.affinity(grads), 3)
    return model, dataset, labels, groups


def test_ncut_groups_output_goes_straight_to_group_losses(grouped):
    model, dataset, labels, groups = grouped
    assert isinstance(groups, np.ndarray) and groups.dtype == np.int64
    x, y = dataset.tensors[0][::3], labels[::3]
    results = []
    for as_given in (groups, torch.as_tensor(groups), groups.astype(np.int32), groups.tolist()):
        model.zero_grad()
        losses, present = gbg.group_losses(model(x), y, as_given, 3)
        losses.sum().backward()
        results.append((losses.detach(), present, [p.grad.clone() for p in model.parameters()]))
    for losses, present, grads in results[1:]:
        assert torch.equal(losses, results[0][0]) and torch.equal(present, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][2]))
    # class_counts as numpy or a tensor: the same losses
    counts = gbg.count_labels(y, K)
    with_numpy = gbg.group_losses(model(x), y, groups, 3, class_counts=counts.numpy())[0]
    with_tensor = gbg.group_losses(model(x), y, groups, 3, class_counts=counts)[0]
    assert torch.equal(with_numpy, with_tensor)


def test_ncut_groups_output_goes_straight_to_the_sampler(grouped):
    _, _, labels, groups = grouped
    batches = lambda labels, groups: list(gbg.GACBatchSampler(labels, groups, 16, seed=3))
    want = batches(labels.numpy(), groups)
    assert len(want) > 1
    for labels_as, groups_as in [(labels, torch.as_tensor(groups)), (labels.tolist(), groups.tolist()),
                                 (labels, groups)]:
        assert batches(labels_as, groups_as) == want
    counts = np.bincount(labels.numpy(), minlength=K)
    assert np.array_equal(gbg.gac_class_probs(counts, groups),
                          gbg.gac_class_probs(torch.as_tensor(counts), torch.as_tensor(groups)))


def test_groupings_compare_as_numpy_or_tensor(grouped):
    _, _, labels, groups = grouped
    A = gbg.affinity(torch.randn(K, 5, generator=torch.Generator().manual_seed(0)))
    other = gbg.count_groups(np.bincount(labels.numpy(), minlength=K), 3)
    assert gbg.ncut_value(A, torch.as_tensor(groups)) == gbg.ncut_value(A, groups)
    assert gbg.adjusted_rand_index(torch.as_tensor(groups), torch.as_tensor(other)) == \
        gbg.adjusted_rand_index(groups, other)
    assert np.array_equal(gbg.count_groups(torch.as_tensor(COUNTS), 3), gbg.count_groups(COUNTS, 3))


def test_readme_shows_the_same_example():
    """README's "Use GBG in your own training loop" is this example, verbatim: the one that runs above."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- usage:begin -->")[1].split("<!-- usage:end -->")[0].strip()
    assert block.startswith("```python\n") and block.endswith("\n```")
    assert block[len("```python\n"):-len("\n```")] == usage_example()
