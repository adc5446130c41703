"""Stage 1 of gbg.py: class gradients (vs. per-sample autograd), their CountSketch (vs. the exact
affinity), and NCut grouping (vs. planted partitions and a brute-force NCut minimum)."""

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gbg

torch.set_num_threads(1)

K = 8
COUNTS = [1, 3, 12, 0, 5, 7, 2, 9]  # unequal sizes, class 3 has no samples


class LabelledImages(torch.utils.data.Dataset):
    """Map-style (image, label) dataset; with_targets=False forces gbg to read labels by iterating."""

    def __init__(self, x, y, with_targets=True):
        self.x, self.y = x, y
        if with_targets:
            self.targets = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_data(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([k for k, c in enumerate(counts) for _ in range(c)])
    y = y[torch.randperm(len(y), generator=g)]  # classes interleaved, as in a real dataset
    centres = torch.randn(len(counts), 3, 6, 6, generator=g)
    x = torch.randn(len(y), 3, 6, 6, generator=g) + 0.5 * centres[y]
    return x, y


def make_model(width=4, hidden=16, dtype=torch.float64, seed=0):
    """Small CNN with BatchNorm; its running stats are made non-trivial by train-mode forwards."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Flatten(), nn.Linear(width * 36, hidden), nn.ReLU(), nn.Linear(hidden, K))
    model = model.to(dtype)
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * torch.randn(16, 3, 6, 6, dtype=dtype) + 0.7)
    return model


def backbone(model):
    return [p for p in model[:-1].parameters()]


def per_sample_grads(model, x, y):
    """Reference: one autograd.grad per sample, in eval mode, w.r.t. the backbone."""
    model.eval()
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1].to(torch.float64)), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, backbone(model))]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup():
    x, y = make_data(COUNTS)
    model = make_model()
    ref_samples = per_sample_grads(model, x, y)
    ref = torch.zeros(K, ref_samples.shape[1], dtype=torch.float64)
    for k in range(K):
        if COUNTS[k]:
            ref[k] = ref_samples[y == k].mean(0)
    return x, y, model, ref_samples, ref


def assert_rows_close(got, want, rtol=1e-5):
    """Per-row relative error in the 2-norm (float32 output vs. float64 reference)."""
    for k in range(want.shape[0]):
        err = (got[k].double() - want[k]).norm()
        assert err <= rtol * max(want[k].norm(), 1e-12), (k, float(err), float(want[k].norm()))


# ---- 1. class_gradients vs. per-sample autograd ----------------------------------------------

def test_class_gradients_match_per_sample_autograd(setup):
    # float64 model: the comparison then measures the method, not float32 summation noise
    x, y, model, _, ref = setup
    model.train()
    bn = model[1]
    running_mean = bn.running_mean.clone()
    with pytest.warns(UserWarning) as record:
        got = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), batch_size=4,
                                  recalibrate_bn=False)  # classes span batches
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == (K, sum(p.numel() for p in backbone(model)))  # classifier left out
    assert_rows_close(got, ref)
    assert model.training and bn.training  # mode restored
    assert torch.equal(bn.running_mean, running_mean)  # eval mode: BN stats untouched
    # the empty class: a zero row, never NaN, and exactly one warning that names it
    assert torch.all(got[3] == 0) and torch.isfinite(got).all()
    assert len(record) == 1 and "[3]" in str(record[0].message)


def test_labels_by_iteration_and_mixed_modes_restored(setup):
    x, y, model, _, ref = setup
    model.train()
    model[1].eval()  # e.g. frozen BN inside a training model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gbg.class_gradients(model, LabelledImages(x, y, with_targets=False), K, backbone(model),
                                  batch_size=256, recalibrate_bn=False)
    assert_rows_close(got, ref)
    assert model.training and model[0].training and not model[1].training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), recalibrate_bn=False)
    assert not model.training


def test_explicit_params_include_classifier(setup):
    x, y, model, _, _ = setup
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gbg.class_gradients(model, LabelledImages(x, y), K, params, recalibrate_bn=False)
    assert got.shape[1] == sum(p.numel() for p in params)
    model.eval()
    k = 2
    loss = F.cross_entropy(model(x[y == k].double()), y[y == k], reduction="mean")
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    assert_rows_close(got[k:k + 1], want[None])


def test_classes_subset_computes_only_those_rows(setup):
    x, y, model, _, ref = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the empty class 3 is not asked for
        got = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), classes=[5, 2], batch_size=4,
                                  num_workers=1, recalibrate_bn=False)  # batches built in a worker process
    assert_rows_close(got[[2, 5]], ref[[2, 5]])
    others = [k for k in range(K) if k not in (2, 5)]
    assert torch.all(got[others] == 0)


def test_max_per_class_averages_a_subset_of_that_size(setup):
    x, y, model, ref_samples, ref = setup
    cap = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), max_per_class=cap, seed=1,
                                  recalibrate_bn=False)
        again = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), max_per_class=cap, seed=1,
                                    classes=[2, 7], recalibrate_bn=False)
    for k in range(K):
        rows = ref_samples[y == k]
        if len(rows) <= cap:
            assert_rows_close(got[k:k + 1], ref[k:k + 1])
            continue
        # brute force: the row must be the mean of some `cap` of the class's samples
        combos = itertools.combinations(range(len(rows)), cap)
        subsets = torch.stack([rows[list(c)].mean(0) for c in combos])
        dist = (subsets - got[k].double()).norm(dim=1) / rows.mean(0).norm()
        assert dist.min() < 1e-5, (k, float(dist.min()))
        assert (dist < 1e-3).sum() == 1  # and not of any other subset
    assert torch.equal(again[[2, 7]], got[[2, 7]])  # the subset does not depend on `classes`


def test_recalibrated_bn_equals_exact_statistics_and_is_restored(setup):
    """Reference: a copy whose BatchNorm statistics are those of all samples at once (one train-mode
    forward with momentum 1), then per-sample autograd in eval mode. With a batch as large as the
    set, the recalibration pass sees that same single batch."""
    x, y, model, _, _ = setup
    ref_model = copy.deepcopy(model)
    ref_model.train()
    ref_model[1].momentum = 1.0
    with torch.no_grad():
        ref_model(x.double())
    ref_samples = per_sample_grads(ref_model, x, y)
    with torch.no_grad():
        confidence = ref_model(x.double()).softmax(1).amax(1).mean().item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, info = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), batch_size=len(y),
                                        recalibrate_bn=True, return_info=True)
    for k in range(K):
        if COUNTS[k]:
            assert_rows_close(got[k:k + 1], ref_samples[y == k].mean(0)[None])
    assert not torch.equal(ref_model[1].running_mean, before["1.running_mean"])  # the test can fail
    for k, v in model.state_dict().items():  # grouping never changes the model
        assert torch.equal(v, before[k]), k
    assert model.training and "forward" not in vars(model[1])
    assert info["samples"] == len(y) and info["max_softmax_mean"] == pytest.approx(confidence, rel=1e-9)


def test_recalibration_undoes_saturation_at_initialisation():
    """A ResNet-20 at initialisation in eval mode with placeholder statistics (mean 0, var 1) does
    not normalise: its outputs saturate and the predicted class's gradient vanishes. Recalibrated,
    the outputs are those of a normalised network."""
    import data_lt
    import train as T
    data = data_lt.build_data("synthetic-lt", "unused", imb_factor=100, seed=0)
    torch.manual_seed(0)
    model = T.build_model("resnet20", 10)
    params = list(model.backbone.parameters())
    plain, plain_info = gbg.class_gradients(model, data.train_eval, 10, params, recalibrate_bn=False,
                                            return_info=True)
    recal, recal_info = gbg.class_gradients(model, data.train_eval, 10, params, recalibrate_bn=True,
                                            return_info=True)
    assert plain_info["max_softmax_mean"] > 0.999 and plain.norm(dim=1).min() < 1e-2
    assert recal_info["max_softmax_mean"] < 0.9 and recal.norm(dim=1).min() > 1.0


# ---- 2. CountSketch ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sketch_setup():
    counts = [4, 9, 12, 6, 5, 7, 3, 10]
    x, y = make_data(counts, seed=3)
    model = make_model(width=16, hidden=40, dtype=torch.float32, seed=3)  # D = 23,560 > m
    exact = gbg.class_gradients(model, LabelledImages(x, y), K, backbone(model), batch_size=4, recalibrate_bn=False)
    return model, LabelledImages(x, y), exact


@pytest.mark.parametrize("m", [2048, 8192])
def test_sketch_cosines_within_documented_bound(sketch_setup, m):
    model, ds, exact = sketch_setup
    assert exact.shape[1] > 2 * m
    A = gbg.affinity(exact)
    pairs = np.triu_indices(K, 1)
    for seed in range(3):
        sketch = gbg.class_gradients(model, ds, K, backbone(model), batch_size=4, sketch_dim=m, seed=seed,
                                     recalibrate_bn=False)
        assert sketch.shape == (K, m)
        err = (gbg.affinity(sketch) - A).abs().numpy()[pairs]
        # documented in gbg.py (Extras: sketched class gradients): max <= 3 sqrt(2/m), mean <= sqrt(2/m)
        assert err.max() <= 3 * math.sqrt(2 / m), (seed, err.max())
        assert err.mean() <= math.sqrt(2 / m), (seed, err.mean())


def test_sketch_deterministic_and_shareable(sketch_setup):
    model, ds, _ = sketch_setup
    sketch = lambda **kw: gbg.class_gradients(model, ds, K, backbone(model), sketch_dim=1024, recalibrate_bn=False, **kw)
    a = sketch(batch_size=4, seed=7)
    b = sketch(batch_size=64, seed=7)
    c = sketch(batch_size=4, seed=8)
    # rows computed by different "ranks" (class subsets) equal the one-process rows
    part = sketch(batch_size=4, seed=7, classes=[1, 6])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # linearity: batching does not matter
    assert torch.equal(part[[1, 6]], a[[1, 6]])
    assert not torch.allclose(a, c)


# ---- affinity -----------------------------------------------------------------------------

def test_affinity_is_cosine_with_zero_rows():
    g = torch.randn(5, 30, dtype=torch.float64)
    g[2] = 0
    A = gbg.affinity(g)
    for i in range(5):
        for j in range(5):
            if i == j:
                want = 1.0
            elif 2 in (i, j):
                want = 0.0
            else:
                want = float(F.cosine_similarity(g[i], g[j], dim=0))
            assert abs(float(A[i, j]) - want) < 1e-12


# ---- 3. NCut grouping -------------------------------------------------------------------------

def planted(sizes, noise, dim=200, seed=0):
    """Class gradients scattered around one random centre per block; returns affinity, truth."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.normal(size=(len(sizes), dim))
    grads = centres[truth] + noise * rng.normal(size=(truth.size, dim))
    return gbg.affinity(torch.from_numpy(grads)), truth


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a[:, None] == a[None], b[:, None] == b[None])


def ncut_brute(A, truth):
    """Reference NCut on W = A + 1 without self-loops (pairs i != j), by explicit loops over pairs."""
    W = np.asarray(A) + 1.0
    total = 0.0
    for g in set(truth.tolist()):
        cut = sum(W[i, j] for i in range(len(truth)) for j in range(len(truth))
                  if truth[i] == g and truth[j] != g)
        assoc = sum(W[i, j] for i in range(len(truth)) for j in range(len(truth)) if truth[i] == g and i != j)
        total += cut / assoc
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ncut_recovers_planted_blocks(seed):
    A, truth = planted([3, 7, 12, 20], noise=0.8, seed=seed)
    groups = gbg.ncut_groups(A, 4, seed=seed)
    assert groups.dtype == np.int64 and groups.shape == (42,)
    assert same_partition(groups, truth)
    assert np.array_equal(groups, truth)  # canonical labels: ordered by smallest class id
    # invariant to a relabelling of the classes
    perm = np.random.default_rng(seed).permutation(42)
    groups_perm = gbg.ncut_groups(A[perm][:, perm], 4, seed=seed)
    assert same_partition(groups_perm, groups[perm])


def test_ncut_recovers_noisy_block_matrix():
    rng = np.random.default_rng(5)
    truth = rng.permutation(np.repeat(np.arange(4), [3, 7, 12, 20]))
    A = np.where(truth[:, None] == truth[None], 0.6, -0.2) + 0.15 * rng.normal(size=(42, 42))
    A = np.clip((A + A.T) / 2, -1, 1)
    np.fill_diagonal(A, 1.0)
    assert same_partition(gbg.ncut_groups(A, 4), truth)


def test_ncut_value_matches_loops_and_beats_baselines():
    A, _ = planted([3, 7, 12, 20], noise=1.0, seed=4)
    groups = gbg.ncut_groups(A, 4)
    value = gbg.ncut_value(A, groups)
    assert abs(value - ncut_brute(A.numpy(), groups)) < 1e-9
    counts = np.random.default_rng(0).integers(5, 500, size=42)
    for s in range(5):
        assert value <= gbg.ncut_value(A, gbg.random_groups(42, 4, seed=s))
    assert value <= gbg.ncut_value(A, gbg.count_groups(counts, 4))


def test_ncut_finds_the_brute_force_minimum():
    A, truth = planted([2, 3, 4], noise=0.9, seed=6)
    W = A.numpy() + 1.0
    np.fill_diagonal(W, 0.0)  # the graph has no self-loops
    # every labelling of 9 classes into 3 non-empty groups, NCut of each by one-hot algebra
    labels = np.array([lab for lab in itertools.product(range(3), repeat=9) if len(set(lab)) == 3])
    H = np.eye(3)[labels]  # [n, 9, 3]
    assoc = np.einsum("nig,ij->ng", H, W)
    within = np.einsum("nig,ij,njg->ng", H, W, H)
    best = labels[np.argmin(((assoc - within) / assoc).sum(1))]
    assert same_partition(gbg.ncut_groups(A, 3), best)
    assert same_partition(best, truth)


def test_ncut_edge_cases():
    A, _ = planted([4, 5, 6], noise=3.0, seed=2)  # weak structure
    assert np.array_equal(gbg.ncut_groups(A, 1), np.zeros(15, dtype=np.int64))
    assert np.array_equal(gbg.ncut_groups(A, 15), np.arange(15))
    for bad in (0, 16):
        message = f"num_groups={bad} must be between 1 and the number of classes K=15"
        with pytest.raises(ValueError, match=message):
            gbg.ncut_groups(A, bad)
    for G in (2, 5, 9, 14):
        for seed in (0, 1):
            a = gbg.ncut_groups(A, G, seed=seed)
            assert np.array_equal(a, gbg.ncut_groups(A, G, seed=seed))  # deterministic
            assert np.array_equal(np.unique(a), np.arange(G))  # every group non-empty


def test_ncut_fills_groups_that_kmeans_leaves_empty():
    # five gradients, each class thrice: for these seeds a single k-means run (scipy 1.17)
    # drains one of its 6 clusters, so the repair step decides the result
    for data_seed in (10, 32, 34, 41):
        g = np.repeat(np.random.default_rng(data_seed).normal(size=(5, 4)), 3, axis=0)[:13]
        A = gbg.affinity(torch.from_numpy(g))
        groups = gbg.ncut_groups(A, 6, seed=0, n_init=1)
        assert np.array_equal(np.unique(groups), np.arange(6))
        assert np.array_equal(groups, gbg.ncut_groups(A, 6, seed=0, n_init=1))


def test_fill_empty_groups_moves_the_farthest_point():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [9.0, 9.0], [9.0, 9.1]])
    labels = np.array([0, 0, 0, 1, 1])  # group 2 empty; point 2 is farthest from its centroid
    assert gbg._fill_empty_groups(X, labels, 3).tolist() == [0, 0, 2, 1, 1]


def test_random_and_count_groups():
    for s in range(4):
        r = gbg.random_groups(10, 3, seed=s)
        assert sorted(np.bincount(r).tolist()) == [3, 3, 4]
        assert np.array_equal(r, gbg.random_groups(10, 3, seed=s))
    assert not all(same_partition(gbg.random_groups(10, 3, seed=0), gbg.random_groups(10, 3, seed=s))
                   for s in range(1, 4))
    counts = np.array([5, 50, 20, 50, 1, 7, 30])
    # sorted (stable): 1, 3, 6, 2, 5, 0, 4 -> chunks of 3, 2, 2
    assert gbg.count_groups(counts, 3).tolist() == [2, 0, 1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="num_groups=8"):
        gbg.count_groups(counts, 8)
    with pytest.raises(ValueError, match="num_groups=0"):
        gbg.random_groups(7, 0)


# ---- 4. The release's label assignment (cluster_qr) against scikit-learn ----------------------------

def _release_affinities():
    """Random (i.i.d. Gaussian class gradients, no structure) and planted (blocks of random sizes,
    weak: noise twice the centres' scale) affinities at K = 10 and 100, several G each."""
    cases = []
    for K, Gs in ((10, (2, 4, 7)), (100, (4, 10, 25))):
        for G in Gs:
            for seed in range(3):
                rng = np.random.default_rng([K, G, seed])
                cases.append(("random", K, G, gbg.affinity(torch.from_numpy(rng.normal(size=(K, 3 * K))))))
                sizes = rng.multinomial(K - G, np.ones(G) / G) + 1
                cases.append(("planted", K, G, planted(list(sizes), 2.0, seed=int(rng.integers(1 << 30)))[0]))
    return cases


def test_cluster_qr_equals_scikit_learn_spectral_clustering():
    """assign="cluster_qr" is the release's grouping (GBG_v1 utils.py l.147): scikit-learn's
    spectral_clustering on W = cos + 1 (the release passes the diagonal 2 as well; scikit-learn's
    Laplacian ignores it), assign_labels="cluster_qr". Same partition on every case. The random
    affinities have no structure, so the partition hangs on small differences of the embedding:
    an embedding without the 1/sqrt(degree) scaling, or with self-loops, changes it (checked)."""
    sklearn_cluster = pytest.importorskip(
        "sklearn.cluster", reason="scikit-learn (a test-only dependency, requirements.txt) is the reference")
    differs_unscaled = differs_self_loops = 0
    for kind, K, G, A in _release_affinities():
        W = A.numpy() + 1.0  # as the release: cosine + 1, diagonal 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn warns on graphs it deems not fully connected
            want = sklearn_cluster.spectral_clustering(W, n_clusters=G, assign_labels="cluster_qr", random_state=0)
        got = gbg.ncut_groups(A, G, assign="cluster_qr")
        assert same_partition(got, want), (kind, K, G)
        assert np.array_equal(got, gbg._canonical(want))
        # what a near miss would give: the unit-row (k-means) embedding, or W_ii = 2 kept
        d = W.sum(1) - 2.0
        Wn = W.copy()
        np.fill_diagonal(Wn, 0.0)
        _, U = np.linalg.eigh(Wn / np.sqrt(np.outer(d, d)))
        differs_unscaled += not same_partition(gbg._cluster_qr(U[:, -G:]), want)
        d2 = W.sum(1)
        _, U2 = np.linalg.eigh(W / np.sqrt(np.outer(d2, d2)))
        differs_self_loops += not same_partition(gbg._cluster_qr(U2[:, -G:] / np.sqrt(d2)[:, None]), want)
    assert differs_unscaled > 0 and differs_self_loops > 0


def test_cluster_qr_is_seed_free_and_reports_empty_groups(monkeypatch):
    A, truth = planted([3, 7, 12, 20], noise=0.8, seed=0)
    a = gbg.ncut_groups(A, 4, seed=0, assign="cluster_qr")
    assert np.array_equal(a, gbg.ncut_groups(A, 4, seed=5, n_init=1, assign="cluster_qr"))
    assert same_partition(a, truth)
    with pytest.raises(ValueError, match="unknown assign 'qr'"):
        gbg.ncut_groups(A, 4, assign="qr")
    # an axis that no class is nearest to leaves a group empty: fewer groups, with a warning
    monkeypatch.setattr(gbg, "_cluster_qr", lambda V: np.minimum(np.arange(len(V)) % 4, 2))
    with pytest.warns(UserWarning, match="cluster_qr left 1 of 4 groups empty; returning 3 groups"):
        b = gbg.ncut_groups(A, 4, assign="cluster_qr")
    assert np.array_equal(np.unique(b), np.arange(3))


@pytest.mark.parametrize("K, G", [(10, 4), (40, 4), (40, 6)])
def test_ncut_embedding_is_that_of_scipys_laplacian_without_self_loops(K, G):
    """The subspace NCut clusters is spanned by the eigenvectors of the G smallest eigenvalues of
    scipy's normalised Laplacian of W = A + 1, which ignores the diagonal (Ng, Jordan & Weiss set
    A_ii = 0; the release's scikit-learn builds its Laplacian the same way). Compared as
    projectors, so that signs and rotations within the subspace do not matter."""
    import scipy.sparse.csgraph
    for seed in range(3):
        rng = np.random.default_rng(seed)
        truth = rng.integers(0, G, K)
        A = np.where(truth[:, None] == truth[None], 0.4, -0.1) + 0.3 * rng.normal(size=(K, K))
        A = np.clip((A + A.T) / 2, -1, 1)
        np.fill_diagonal(A, 1.0)
        U, d = gbg._ncut_embedding(gbg._graph_weights(A), G)
        W = A + 1.0
        vals, vecs = np.linalg.eigh(scipy.sparse.csgraph.laplacian(W, normed=True))
        assert vals[G] - vals[G - 1] > 1e-6  # a well-defined subspace
        want = vecs[:, :G] @ vecs[:, :G].T
        assert np.allclose(U @ U.T, want, atol=1e-9)
        assert np.allclose(d, W.sum(1) - np.diag(W), rtol=1e-12)
        # with the self-loops kept (W_ii = 2) the subspace is another one
        Wl = A + 1.0
        dl = Wl.sum(1)
        _, Ul = np.linalg.eigh(Wl / np.sqrt(np.outer(dl, dl)))
        assert not np.allclose(Ul[:, -G:] @ Ul[:, -G:].T, want, atol=1e-6)


def test_count_bins_groups_are_li_et_al_2020_bins():
    """Reference: each class placed by hand in Li et al.'s count ranges [0,10), [10,100),
    [100,1000), [1000,inf), the bins renumbered from the most frequent, empty bins dropped."""
    counts = [1280, 5, 999, 1000, 10, 9, 100, 99, 450]  # ImageNet-LT's range: all four bins used
    bins = [3 if c >= 1000 else 2 if c >= 100 else 1 if c >= 10 else 0 for c in counts]
    want = [3 - b for b in bins]  # head bin first
    assert gbg.count_bins_groups(counts).tolist() == want
    cifar10 = [int(5000 * 100 ** (-k / 9)) for k in range(10)]  # 5000 ... 50: no class below 10
    assert gbg.count_bins_groups(cifar10).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert gbg.count_bins_groups(torch.tensor([3, 50, 7])).tolist() == [1, 0, 1]  # empty bins go
    assert gbg.count_bins_groups([5, 50], edges=(20,)).tolist() == [1, 0]


def test_recalibration_weights_batches_by_their_size():
    """Batches of 5, 5 and 2 samples: the recalibrated running mean is the mean over all 12
    samples, and the running variance the size-weighted mean of the batches' unbiased
    variances (a plain average over batches would give the short batch 1/3 of the weight)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).double()
    x = torch.randn(12, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + torch.arange(12.0)[:, None]
    batches = [(x[:5], None), (x[5:10], None), (x[10:], None)]
    gbg._recalibrate_bn(bn, batches, torch.device("cpu"), torch.float64)
    var = sum(len(b) * b.var(0, unbiased=True) for b, _ in batches) / 12
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)


def test_recalibration_never_makes_a_batch_of_one():
    """BatchNorm1d in train mode refuses a batch of one: with N = batch_size + 1 samples the
    recalibration's last sample joins the batch before it, and the pass runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    y = torch.tensor([0, 1, 2] * 3)
    data = LabelledImages(torch.randn(9, 4, dtype=torch.float64), y)
    grads = gbg.class_gradients(model, data, 3, list(model[:3].parameters()), batch_size=8)
    assert grads.shape == (3, 4 * 6 + 6 + 12) and torch.isfinite(grads).all()


def test_to_device_blocks_on_copies_to_the_cpu(monkeypatch):
    """A copy off the device must not be non_blocking (the host could read it before it lands);
    a meta tensor stands in for a GPU one."""
    calls = []
    real_to = torch.Tensor.to
    def to(self, *args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(self.shape) if self.device.type == "meta" else real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    gbg.to_device(torch.zeros(2, device="meta"), "cpu")
    assert calls == [{"non_blocking": False}]
