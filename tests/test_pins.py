"""Pins on details the rest of the suite lets through: each test here fails on a small, realistic
bug (see tests/plant_bugs.py, which plants them one at a time), against a reference that does
not share the code under test: exhaustive search over partitions, values derived by hand, a hand
count, an uninterrupted run, a direct autograd computation."""
import argparse
import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

import data_lt
import gbg
import train as T


# ----------------------------------------------------------------------------- NCut (Eq. 8-9)

def all_partitions(K, G):
    """Every partition of K classes into G non-empty groups, as restricted growth strings
    (the first class in group 0, each class in a used group or the next new one): [n, K]."""
    out, prefix = [], []

    def grow(used):
        i = len(prefix)
        if i == K:
            if used == G:
                out.append(list(prefix))
            return
        if G - used > K - i:
            return
        for g in range(min(used + 1, G)):
            prefix.append(g)
            grow(max(used, g + 1))
            prefix.pop()

    grow(0)
    return np.array(out)


def eq9(A, labels, G):
    """Eq. 9 on W = A + 1 without self-loops (W_ii = 0) for a batch of labellings [n, K]: sum over
    groups of cut(V, rest) / assoc(V, all), by one-hot algebra (not through gbg)."""
    W = np.asarray(A, dtype=np.float64) + 1.0
    np.fill_diagonal(W, 0.0)
    H = (np.asarray(labels)[:, None, :] == np.arange(G)[None, :, None]).astype(np.float64)  # [n, G, K]
    HW = H @ W
    assoc = HW.sum(-1)
    within = (HW * H).sum(-1)
    return ((assoc - within) / assoc).sum(-1)


def weak_blocks(K, G, seed, strength, dim=6):
    """Cosine affinity of K class gradients from G weak clusters with unequal norms: many
    negative cosines, blocks barely above the noise, near-ties between partitions."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, G, K)
    mu = rng.normal(size=(G, dim))
    scale = rng.uniform(0.3, 3.0, K)
    g = (mu[blocks] * strength + rng.normal(size=(K, dim))) * scale[:, None]
    return gbg.affinity(torch.as_tensor(g)).numpy()


# (strength, seed) of 10-class, 3-group cases where the spectral NCut reaches the exhaustive
# optimum of Eq. 9 on the graph without self-loops for every k-means seed, while the same NCut on
# the graph with self-loops (W_ii = 2) misses it for 5 to 10 of the 10 seeds; the second-best
# partition is within 0.0001-0.023 of the optimum.
HARD = [(0.5, 0), (0.5, 4), (0.8, 2), (0.8, 11), (1.0, 2)]


def test_ncut_value_by_hand():
    """3 classes, A = [[1, .5, -.5], [.5, 1, 0], [-.5, 0, 1]], groups {0, 1} {2}.
    W = A + 1 off the diagonal, no self-loops = [[0, 1.5, .5], [1.5, 0, 1], [.5, 1, 0]].
    Group {0,1}: cut = .5 + 1 = 1.5, assoc = 1.5 + .5 + 1.5 + 1 = 4.5.
    Group {2}: cut = 1.5, assoc = 1.5.  NCut = 1.5/4.5 + 1.5/1.5 = 1/3 + 1 = 4/3.
    (With the self-loops W_ii = 2 it would be 1.5/8.5 + 1.5/3.5 = 72/119.)"""
    A = np.array([[1, .5, -.5], [.5, 1, 0], [-.5, 0, 1]])
    assert gbg.ncut_value(A, [0, 0, 1]) == pytest.approx(4 / 3, abs=1e-15)
    assert eq9(A, [[0, 0, 1]], 2)[0] == pytest.approx(4 / 3, abs=1e-15)


@pytest.mark.parametrize("strength,seed", HARD)
def test_ncut_reaches_the_exhaustive_optimum_on_hard_cases(strength, seed):
    K, G = 10, 3
    A = weak_blocks(K, G, seed, strength)
    assert (A < 0).sum() >= 10  # negative affinities: the +1 shift matters
    parts = all_partitions(K, G)
    assert len(parts) == 9330  # Stirling S(10, 3)
    values = eq9(A, parts, G)
    best = values.min()
    assert np.sort(values)[1] - best < 0.04  # a near-tie: a sloppy NCut lands on the runner-up
    for s in range(10):
        groups = gbg.ncut_groups(A, G, seed=s)
        assert sorted(set(groups.tolist())) == [0, 1, 2]
        got = eq9(A, groups[None], G)[0]
        assert got == pytest.approx(best, abs=1e-12), (s, got, best)
        assert gbg.ncut_value(A, groups) == pytest.approx(got, abs=1e-12)


# ----------------------------------------------------------------------------- Frank-Wolfe

def brute_min_norm(M):
    """min a^T M a on the simplex by enumerating supports: the KKT point on a support S solves
    [M_S 1; 1^T 0][x; -mu] = [0; 1]; it is the optimum when x >= 0 and (M a)_j >= a^T M a for all j."""
    G = M.shape[0]
    best = None
    for mask in range(1, 2 ** G):
        S = [j for j in range(G) if mask >> j & 1]
        A = np.zeros((len(S) + 1, len(S) + 1))
        A[:-1, :-1] = M[np.ix_(S, S)]
        A[:-1, -1] = A[-1, :-1] = 1.0
        b = np.zeros(len(S) + 1)
        b[-1] = 1.0
        x = np.linalg.solve(A, b)[:-1]
        if x.min() < -1e-12:
            continue
        a = np.zeros(G)
        a[S] = x
        obj = a @ M @ a
        if (M @ a >= obj - 1e-10).all() and (best is None or obj < best[1]):
            best = (a, obj)
    return best


def test_frank_wolfe_first_step_is_the_exact_line_search():
    """M = [[1, .5, .25], [.5, 3, 0], [.25, 0, 2]]. Start: the best single gradient, vertex 0
    (smallest diagonal). M a = (1, .5, .25): the best vertex is s = 2, gap 1 - .25 = .75.
    On a = (1 - g, 0, g): f(g) = (1-g)^2 + 2 g (1-g) .25 + 2 g^2, f'(g) = -1.5 + 5 g = 0 at g = .3
    (= gap / ||e_0 - e_2||_M^2 = .75 / (1 + 2 - 2 * .25)). So one step gives (.7, 0, .3)."""
    M = np.array([[1, .5, .25], [.5, 3, 0], [.25, 0, 2]])
    np.testing.assert_allclose(gbg._frank_wolfe(M, 0, 0.0), [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(gbg._frank_wolfe(M, 1, 0.0), [.7, 0, .3], atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frank_wolfe_alone_descends_to_the_optimum(seed):
    """Without the active-set polish: the objective never rises from one iteration to the next
    (exact line search), the duality gap max_j (M a)_j on the support - min_j (M a)_j closes, and
    the iterate reaches the optimum found by enumerating supports."""
    rng = np.random.default_rng(seed)
    G = 6
    B = rng.normal(size=(G, G + 2)) + rng.normal(size=G + 2)  # correlated gradients: an interior optimum
    M = B @ B.T
    M /= np.diag(M).max()
    a_star, f_star = brute_min_norm(M)
    objs, gaps = [], []
    for it in range(0, 60):
        a = gbg._frank_wolfe(M, it, 0.0)
        assert a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        Ma = M @ a
        objs.append(a @ Ma)
        gaps.append(Ma[a > 0].max() - Ma.min())
    assert all(b <= a + 1e-15 for a, b in zip(objs, objs[1:])), objs
    assert objs[-1] < objs[0] - 1e-3
    a = gbg._frank_wolfe(M, 2000, 0.0)
    assert a @ M @ a == pytest.approx(f_star, abs=1e-12)
    np.testing.assert_allclose(a, a_star, atol=1e-6)
    Ma = M @ a
    assert Ma[a > 0].max() - Ma.min() < 1e-9 < gaps[0]


# ----------------------------------------------------------------------------- evaluate()

class Oracle(nn.Module):
    """A 'model' whose prediction for a sample is the number stored in its input."""

    def __init__(self, K):
        super().__init__()
        self.K = K
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.eye(self.K)[x[:, 0].long()] + 0 * self.dummy


def test_evaluate_many_medium_few_against_a_hand_count():
    """Training counts [150, 120, 50, 30, 10, 5]: Many = {0, 1} (> 100), Medium = {2, 3},
    Few = {4, 5} (< 20). Test set (label: predictions):
        0: 0 0 0 3   -> 3 of 4      1: 1 5        -> 1 of 2      Many   4 / 6
        2: 2 2 2     -> 3 of 3      3: 0          -> 0 of 1      Medium 3 / 4
        4: 4 1 1 1   -> 1 of 4      5: (none)                    Few    1 / 4
    Top-1: 8 / 14."""
    counts = np.array([150, 120, 50, 30, 10, 5])
    y = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4]
    p = [0, 0, 0, 3, 1, 5, 2, 2, 2, 0, 4, 1, 1, 1]
    order = [13, 2, 7, 0, 9, 4, 11, 1, 5, 12, 3, 8, 6, 10]  # shuffled, and split over three batches
    xs = torch.tensor([[float(p[i])] for i in order])
    ys = torch.tensor([y[i] for i in order])
    loader = [(xs[:5], ys[:5]), (xs[5:9], ys[5:9]), (xs[9:], ys[9:])]
    args = argparse.Namespace(amp=False, rank=0, world_size=1, distributed=False)
    out = T.evaluate(Oracle(6), loader, counts, torch.device("cpu"), args)
    assert out["top1"] == pytest.approx(100 * 8 / 14, abs=1e-12)
    assert out["many"] == pytest.approx(100 * 4 / 6, abs=1e-12)
    assert out["medium"] == pytest.approx(100 * 3 / 4, abs=1e-12)
    assert out["few"] == pytest.approx(100 * 1 / 4, abs=1e-12)


# ----------------------------------------------------------------------------- GAC beta

def test_gac_class_probs_by_hand():
    """The reading of the appendix (results/README.md, gbg.gac_class_probs): beta_i = rho + lam *
    delta_i, delta_i = log(Nmax_i / Nmin_i) / log(Nmax / Nmin), p_j = (1 - beta_i) / (1 - beta_i^N_j) normalised in
    the group. Counts [4, 2, 4, 1, 3, 0], groups [0, 0, 1, 1, 2, 2]; Nmax / Nmin = 4 / 1 (class 5
    has no samples and is left out); rho = .25, lam = .5.
      group 0 {4, 2}: delta = log 2 / log 4 = 1/2, beta = 1/2: p = (1/2)/(15/16) = 8/15 and
                      (1/2)/(3/4) = 2/3 -> 8/18 = 4/9, 10/18 = 5/9
      group 1 {4, 1}: delta = 1, beta = 3/4: p = (1/4)/(175/256) = 64/175 and (1/4)/(1/4) = 1
                      -> 64/239, 175/239
      group 2 {3, 0}: the only class with samples gets 1, the empty class 0."""
    probs = gbg.gac_class_probs([4, 2, 4, 1, 3, 0], [0, 0, 1, 1, 2, 2], rho=0.25, lam=0.5)
    np.testing.assert_allclose(probs, [4 / 9, 5 / 9, 64 / 239, 175 / 239, 1, 0], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- defaults

def _defaults(*argv):
    args = T.get_args_parser().parse_args(list(argv))
    args.world_size = 1
    T.fill_defaults(args)
    if args.loss == "bcl":
        T.fill_bcl_defaults(args)
    return args


def test_bcl_defaults_to_the_releases_group_loss_and_every_other_source_wins():
    """--loss bcl: a group's loss is the mean over its samples (the release's); CE keeps Eq. 10's
    class means; an explicit flag, --preset paper (Eq. 10) and --preset release (samples) win."""
    for dataset in ("cifar10-lt", "imagenet-lt", "inat2018"):
        assert _defaults("--loss", "bcl", "--dataset", dataset).group_loss == "sample"
        assert _defaults("--dataset", dataset).group_loss == "class"
    assert _defaults("--loss", "bcl", "--group-loss", "class").group_loss == "class"
    assert _defaults("--loss", "ce", "--group-loss", "sample").group_loss == "sample"
    assert _defaults("--loss", "bcl", "--preset", "paper").group_loss == "class"
    assert _defaults("--preset", "release").group_loss == "sample"


def test_bcl_group_loss_default_follows_a_loss_set_by_the_preset(monkeypatch):
    """The BCL layer applies when the loss comes from a preset too (not only from --loss): a preset
    that makes the run BCL without naming a group loss gets BCL's sample means, not CE's class means."""
    monkeypatch.setitem(T.PRESETS, "release", {k: v for k, v in T.RELEASE.items() if k != "group_loss"})
    assert _defaults("--preset", "release").group_loss == "sample"
    monkeypatch.setitem(T.PRESETS, "paper", {**T.PAPER, "loss": "bcl"})
    assert _defaults("--preset", "paper").group_loss == "class"  # the preset's own value still wins


def test_a_grouping_at_or_after_the_last_epoch_is_refused():
    """--group-epoch N with N >= --epochs would train plain CE while the run line says GBG."""
    with pytest.raises(data_lt.UserError, match="--group-epoch 10 is not before the run's last epoch"):
        _defaults("--epochs", "10", "--group-epoch", "10")
    assert _defaults("--epochs", "10", "--group-epoch", "9").group_epoch == 9
    assert _defaults("--epochs", "10", "--group-epoch", "10", "--grouping", "none").group_epoch == 10


def test_negative_seeds_are_one_line():
    """numpy's SeedSequence and the view seeds take non-negative seeds only (a traceback inside
    the DataLoader workers otherwise)."""
    for flag in ("--seed", "--data-seed"):
        with pytest.raises(data_lt.UserError, match="must be >= 0"):
            _defaults(flag, "-1")


def test_defaults_quoted_in_readme():
    a = _defaults()
    assert (a.normalize, a.group_loss, a.moo_grad, a.moo_update, a.moo_gram, a.moo_every, a.recalibrate_bn) == \
        ("l2", "class", "exact", "scaled", "all", 1, True)
    assert (a.num_groups, a.grouping, a.sampler, a.gac_fill, a.group_epoch, a.regroup_every) == (4, "gbg", "gac", 0.1, 5, 0)
    # a run no longer than its warm-up groups at once; --group-epoch 0 is the paper's setting
    assert _defaults("--epochs", "5").group_epoch == 0 and _defaults("--group-epoch", "0").group_epoch == 0
    assert _defaults("--dataset", "imagenet-lt").group_epoch == 0  # no warm-up there
    assert (a.dataset, a.imb_factor, a.batch_size, a.loss, a.moo) == ("cifar10-lt", 100, 256, "ce", "mgda")
    # CIFAR: 200 epochs, lr 0.1, 5 warm-up epochs, x0.1 at 160 and 180, wd 5e-4, ResNet-32
    assert (a.arch, a.epochs, a.lr, a.warmup_epochs, a.schedule, a.wd, a.momentum) == \
        ("resnet32", 200, 0.1, 5, "step", 5e-4, 0.9)
    # ImageNet-LT: 90 epochs, cosine, wd 5e-4; iNat: 100 epochs, cosine, wd 1e-4 (ResNet-50)
    a = _defaults("--dataset", "imagenet-lt")
    assert (a.arch, a.epochs, a.schedule, a.wd, a.lr, a.warmup_epochs) == ("resnet50", 90, "cosine", 5e-4, 0.1, 0)
    a = _defaults("--dataset", "inat2018")
    assert (a.arch, a.epochs, a.schedule, a.wd, a.lr, a.warmup_epochs) == ("resnet50", 100, "cosine", 1e-4, 0.2, 0)
    # BCL weights: CIFAR 2.0 / 1.6 / 0.1, ImageNet-LT and iNat 1.0 / 0.35 / 0.07
    for dataset, want in (("cifar10-lt", (2.0, 1.6, 0.1)), ("cifar100-lt", (2.0, 1.6, 0.1)),
                          ("imagenet-lt", (1.0, 0.35, 0.07)), ("inat2018", (1.0, 0.35, 0.07))):
        a = _defaults("--dataset", dataset, "--loss", "bcl")
        assert (a.la_weight, a.bcl_weight, a.bcl_temp) == want, dataset
    a = _defaults("--loss", "bcl", "--la-weight", "2", "--bcl-weight", "0.6")  # flags win over presets
    assert (a.la_weight, a.bcl_weight, a.bcl_temp) == (2.0, 0.6, 0.1)
    # the GAC sampler's rho = 0.9999, lam = 1e-5; NCut: 10 k-means restarts
    sig = inspect.signature(gbg.gac_class_probs).parameters
    assert (sig["rho"].default, sig["lam"].default) == (0.9999, 1e-5)
    assert inspect.signature(gbg.ncut_groups).parameters["n_init"].default == 10


# ----------------------------------------------------------------------------- grouping size

class _Stop(Exception):
    pass


@pytest.mark.parametrize("K,P,sketch_flag,want", [(5000, 100_000, 0, None),    # K P 4 bytes = 2 GB: exact
                                                   (5001, 100_000, 0, 16384),  # above 2 GB: sketch
                                                   (5001, 100_000, 256, 256),  # --sketch-dim wins
                                                   (10, 1000, 64, 64)])
def test_sketch_switches_on_above_2_gb(monkeypatch, K, P, sketch_flag, want):
    seen = {}

    def spy(model, dataset, num_classes, params, **kw):
        seen.update(kw, num_classes=num_classes)
        raise _Stop

    monkeypatch.setattr(T.gbg, "class_gradients", spy)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.w = nn.Parameter(torch.zeros(P))
    data = argparse.Namespace(num_classes=K, train_eval=None, kind="tensor", class_counts=np.ones(K, dtype=int))
    args = _defaults("--dataset", "synthetic-lt", "--sketch-dim", str(sketch_flag))
    args.rank, args.distributed, args.num_groups = 0, False, 2
    with pytest.raises(_Stop):
        T.make_groups(model, data, args, torch.device("cpu"))
    assert seen["num_classes"] == K and seen["sketch_dim"] == want
