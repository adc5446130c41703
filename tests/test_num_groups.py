"""gbg.choose_num_groups (the number of groups read from the affinity's spectrum) on planted block
structures and on structureless affinities; gbg.adjusted_rand_index against pair counting; and
train.py's --num-groups auto, --max-groups and grouping history end to end (synthetic-lt, ResNet-8),
resume included."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse.csgraph
import pytest
import torch

import data_lt
import gbg
import train as T

torch.set_num_threads(1)

# Planted structures: 2 to 6 blocks of unequal sizes (up to 4:1), at K = 10, 40 and 100, with
# noise 0.1 per affinity (0.03 at K = 10). At K = 10 the null has only 45 affinities to permute,
# and blocks of 2-3 classes stand out of it only when the noise is small: measured over seeds
# 0-7 on the graph without self-loops, [2, 2, 3, 3] with noise 0.05 was found for 6 seeds of 8,
# with 0.03 for all 8 (a block of 2 has one edge inside; with self-loops 0.05 sufficed).
SIZES = {
    10: [[3, 7], [3, 3, 4], [2, 2, 3, 3]],
    40: [[15, 25], [7, 13, 20], [5, 8, 12, 15], [4, 6, 8, 10, 12], [5, 5, 6, 7, 8, 9]],
    100: [[35, 65], [15, 30, 55], [10, 20, 30, 40], [8, 12, 20, 25, 35], [8, 11, 14, 18, 22, 27]],
}
NOISE = {10: 0.03, 40: 0.1, 100: 0.1}
CASES = [(K, sizes, seed) for K, table in SIZES.items() for sizes in table for seed in range(4)]


def max_groups(K):
    return min(8, K // 2)  # train.py's default for --max-groups


def planted_blocks(sizes, seed, noise=0.1):
    """Cosine-like affinity of classes in blocks, classes in random order: within a block about
    U(0.5, 0.7) (drawn per block), between two blocks about U(-0.1, 0.25) (drawn per pair of
    blocks), plus N(0, noise^2) per pair of classes; symmetric, unit diagonal, clipped to [-1, 1].
    Returns the affinity and the planted block of each class."""
    rng = np.random.default_rng(seed)
    G = len(sizes)
    truth = rng.permutation(np.repeat(np.arange(G), sizes))
    level = rng.uniform(0.0, 0.2, (G, G))
    level = np.triu(level, 1) + np.triu(level, 1).T + np.diag(rng.uniform(0.55, 0.65, G))
    A = level[truth][:, truth] + noise * rng.normal(size=(truth.size, truth.size))
    A = np.clip(np.triu(A, 1) + np.triu(A, 1).T, -1, 1)
    np.fill_diagonal(A, 1.0)
    return A, truth


def iid_affinity(K, seed):
    """No structure: i.i.d. off-diagonal affinities N(0.3, 0.2^2), symmetric, unit diagonal."""
    rng = np.random.default_rng(seed)
    A = np.clip(np.triu(0.3 + 0.2 * rng.normal(size=(K, K)), 1), -1, 1)
    A = A + A.T
    np.fill_diagonal(A, 1.0)
    return A


def spectrum(A):
    """Reference: every eigenvalue of D^-1/2 W D^-1/2 on W = A + 1 without self-loops, decreasing:
    1 - the eigenvalues of scipy's normalised Laplacian, which ignores W's diagonal."""
    L = scipy.sparse.csgraph.laplacian(np.asarray(A, dtype=np.float64) + 1.0, normed=True)
    return 1.0 - np.linalg.eigvalsh(L)


@pytest.mark.parametrize("K, sizes, seed", CASES)
def test_recovers_the_planted_number_of_blocks(K, sizes, seed):
    A, truth = planted_blocks(sizes, seed, NOISE[K])
    choice = gbg.choose_num_groups(A, max_groups(K), seed=seed)
    assert choice["structured"] and not choice["fallback_used"]
    assert choice["num_groups"] == len(sizes)
    # the spectrum it reports is the matrix's, and the gaps are its differences
    want = spectrum(A)[:max_groups(K) + 1]
    assert np.allclose(choice["eigenvalues"], want, rtol=0, atol=1e-12)
    assert np.allclose(choice["gaps"], want[1:-1] - want[2:], rtol=0, atol=1e-12)
    # the permutation test, from its own numbers: the planted gap beats every null maximum (19
    # permutations: p = 1/20), every later gap stays below the threshold
    G = len(sizes)
    null = np.array(choice["null_max_gaps"])
    assert choice["gaps"][G - 2] > null.max() and choice["p_value"] == pytest.approx(0.05)
    assert all(g <= choice["null_gap_quantile"] for g in choice["gaps"][G - 1:])
    # NCut with the chosen G finds the planted blocks
    assert gbg.adjusted_rand_index(gbg.ncut_groups(A, choice["num_groups"], seed=seed), truth) == 1.0


def test_eigengap_heuristic_stops_early_on_unequal_blocks():
    """Why the largest significant gap and not the largest gap: with blocks of 10 to 40 classes
    a gap between two block eigenvalues (a large block against a smaller one) is larger than
    the gap after the last block, so the eigengap heuristic stops before 4."""
    A, truth = planted_blocks([10, 20, 30, 40], seed=0)
    choice = gbg.choose_num_groups(A, 8)
    gaps = choice["gaps"]
    assert choice["eigengap_choice"] < 4 and gaps[choice["eigengap_choice"] - 2] == max(gaps) > gaps[4 - 2]
    assert choice["num_groups"] == 4
    assert gbg.adjusted_rand_index(gbg.ncut_groups(A, 4), truth) == 1.0


def binomial_upper(n, q, tail=1e-3):
    """The smallest count c with P(Binomial(n, q) >= c) < tail."""
    return next(c for c in range(n + 2) if sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k)
                                               for k in range(c, n + 1)) < tail)


@pytest.mark.parametrize("K, draws", [(10, 100), (40, 100), (100, 40)])
def test_structureless_affinities_fall_back(K, draws):
    """i.i.d. affinities are exchangeable, so the permutation test is exact: P(p <= q) <= q for q
    a multiple of 1/20. Over the draws, the count of p-values <= 0.05 (structure reported), 0.25
    and 0.5 each stays below the level a Binomial(draws, q) exceeds with probability < 0.001, and
    every draw without structure returns the fallback."""
    p = []
    for seed in range(draws):
        choice = gbg.choose_num_groups(iid_affinity(K, seed), max_groups(K), fallback=3, seed=seed)
        p.append(choice["p_value"])
        assert choice["structured"] == (choice["p_value"] <= 0.05)
        if not choice["structured"]:
            assert choice["num_groups"] == 3 and choice["fallback_used"]
    for q in (0.05, 0.25, 0.5):
        count = sum(x <= q + 1e-12 for x in p)
        assert count < binomial_upper(draws, q), (q, count)


def test_affinity_without_spread_has_no_structure():
    """Every class alike: all gaps are 0 (up to rounding), as are the null's: p = 1, fallback."""
    for K in (5, 30):
        A = np.full((K, K), 0.4)
        np.fill_diagonal(A, 1.0)
        choice = gbg.choose_num_groups(A, 4)
        assert not choice["structured"] and choice["p_value"] == 1.0 and choice["num_groups"] == 4
        assert choice["gaps"] == [0.0] * 3


def test_lanczos_path_equals_the_dense_one(monkeypatch):
    """Above _DENSE_MAX classes the eigenvalues come from scipy's eigsh (to 1e-8 relative
    accuracy): the same result."""
    A, truth = planted_blocks([8, 12, 20, 25], seed=1)
    dense = gbg.choose_num_groups(A, 8, seed=3)
    monkeypatch.setattr(gbg, "_DENSE_MAX", 10)
    lanczos = gbg.choose_num_groups(A, 8, seed=3)
    assert lanczos["num_groups"] == dense["num_groups"] == 4
    for key in ("eigenvalues", "gaps", "null_max_gaps"):
        assert np.allclose(lanczos[key], dense[key], rtol=0, atol=1e-8), key
    assert lanczos["gap_p_values"] == dense["gap_p_values"]


def test_deterministic_for_a_seed_and_takes_tensors():
    A, _ = planted_blocks([4, 6, 10], seed=2, noise=0.3)
    a = gbg.choose_num_groups(torch.from_numpy(A), 6, seed=5)
    assert a == gbg.choose_num_groups(A, 6, seed=5)
    assert a["null_max_gaps"] != gbg.choose_num_groups(A, 6, seed=6)["null_max_gaps"]
    assert len(a["eigenvalues"]) == 7 and len(a["gaps"]) == len(a["gap_p_values"]) == 5
    assert a["eigenvalues"][0] == pytest.approx(1.0, abs=1e-12)  # the trivial eigenvector sqrt(d)


def test_bad_arguments():
    A, _ = planted_blocks([3, 4], seed=0)
    for bad in (1, 7):
        with pytest.raises(ValueError, match=f"max_groups={bad} must be between 2 and K - 1 = 6"):
            gbg.choose_num_groups(A, bad)
    with pytest.raises(ValueError, match="fallback=8"):
        gbg.choose_num_groups(A, 3, fallback=8)
    with pytest.raises(ValueError, match="num_permutations >= 19"):
        gbg.choose_num_groups(A, 3, num_permutations=18)
    with pytest.raises(ValueError, match="alpha=0"):
        gbg.choose_num_groups(A, 3, alpha=0)
    with pytest.raises(ValueError, match="square"):
        gbg.choose_num_groups(A[:3], 3)


# ---- adjusted Rand index ----------------------------------------------------------------------

def ari_by_pairs(a, b):
    """Reference: the adjusted Rand index from the four pair counts (Hubert & Arabie 1985 in
    the pair-counting form): n11 pairs together in both, n00 apart in both, n10 / n01 together in
    one only. ARI = 2 (n11 n00 - n10 n01) / ((n11 + n10)(n10 + n00) + (n11 + n01)(n01 + n00))."""
    n11 = n00 = n10 = n01 = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        n11 += same_a and same_b
        n00 += not same_a and not same_b
        n10 += same_a and not same_b
        n01 += same_b and not same_a
    den = (n11 + n10) * (n10 + n00) + (n11 + n01) * (n01 + n00)
    return 1.0 if den == 0 else 2 * (n11 * n00 - n10 * n01) / den


def test_adjusted_rand_index_matches_pair_counting():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 30))
        a = rng.integers(0, rng.integers(1, 6), n)
        # b: a copy with some labels redrawn, so that agreement ranges from none to full
        b = np.where(rng.random(n) < rng.random(), rng.integers(0, 5, n), a)
        assert gbg.adjusted_rand_index(a, b) == pytest.approx(ari_by_pairs(a, b), abs=1e-12), (a, b)
        assert gbg.adjusted_rand_index(a, b) == pytest.approx(gbg.adjusted_rand_index(b, a), abs=1e-15)


def test_adjusted_rand_index_cases():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert gbg.adjusted_rand_index(a, (a + 1) % 3 + 7) == 1.0  # same partition, other labels
    assert gbg.adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0  # both one group
    assert gbg.adjusted_rand_index(np.arange(5), np.arange(5)) == 1.0  # both singletons
    assert gbg.adjusted_rand_index(np.zeros(5), np.arange(5)) == 0.0  # one group vs singletons
    assert gbg.adjusted_rand_index([3], [1]) == 1.0
    # the mean over random relabellings with fixed group sizes is 0 (the "adjusted")
    b = np.array([0, 0, 0, 1, 1, 2, 2])
    perms = [gbg.adjusted_rand_index(a, b[list(p)]) for p in itertools.permutations(range(7))]
    assert abs(np.mean(perms)) < 1e-12 and min(perms) < 0
    with pytest.raises(ValueError, match="same classes"):
        gbg.adjusted_rand_index([0, 1], [0, 1, 2])


# ---- train.py: --num-groups auto, --max-groups, the grouping history ---------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--batch-size", "64",
        "--print-freq", "1000", "--workers", "0"]
TIMING = ("time_s", "train_time_s", "images_per_s")


def train(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def ckpt(out):
    return torch.load(Path(out) / "checkpoint.pth", map_location="cpu", weights_only=False)


def labels(members, K=10):
    out = np.full(K, -1)
    for g, m in enumerate(members):
        out[m] = g
    return out


def reference_choice(out):
    """What --num-groups auto must choose from the checkpointed model, computed here from gbg's
    public functions: exact class gradients over the training set (BatchNorm recalibrated, as
    train.py's default), cosine affinity, choose_num_groups with train.py's defaults for 10
    classes (max 5 groups, fallback 4, seed 0), NCut with the chosen G."""
    data = data_lt.build_data("synthetic-lt", "./data", imb_factor=100, seed=0)
    model = T.build_model("resnet8", data.num_classes)
    model.load_state_dict(ckpt(out)["model"])
    grads = gbg.class_gradients(model, data.train_eval, data.num_classes, list(model.backbone.parameters()),
                                recalibrate_bn=True)
    A = gbg.affinity(grads)
    choice = gbg.choose_num_groups(A, 5, fallback=4, seed=0)
    groups = gbg.ncut_groups(A, choice["num_groups"], seed=0)
    return choice, [np.flatnonzero(groups == g).tolist() for g in range(choice["num_groups"])]


def test_auto_groups_regroup_history_and_exact_resume(tmp_path):
    """--num-groups auto --group-epoch 1 --regroup-every 1 over 3 epochs, uninterrupted and cut
    twice (after epoch 0, before the choice; after epoch 1, after it): the choice equals
    choose_num_groups on the class gradients of the epoch-0 checkpoint; G is fixed from then on
    (the regrouping at epoch 2 keeps it, also after the resume, which must not choose again);
    groups.json keeps both groupings with their adjusted Rand index, which log.txt repeats for
    the regrouping epoch; the resumed run ends with the uninterrupted run's weights, log and
    groups.json."""
    args = [*TINY, "--num-groups", "auto", "--group-epoch", "1", "--regroup-every", "1", "--epochs", "3"]
    ref = train(*args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut"
    first = train(*args, "--output-dir", str(out), "--exit-after-epoch", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    want, want_groups = reference_choice(out)
    second = train(*args, "--output-dir", str(out), "--exit-after-epoch", "1")
    third = train(*args, "--output-dir", str(out))
    assert second.returncode == 0 and third.returncode == 0, second.stderr[-3000:] + third.stderr[-3000:]
    assert "num groups: auto" in second.stdout and "num groups: auto" not in third.stdout

    info = json.load(open(out / "groups.json"))
    choice, G = info["num_groups_auto"], want["num_groups"]
    # at epoch 1 the synthetic set's shared colours / orientations show: structure, G below the
    # fallback (measured: G = 2, its gap 1.38 x the null threshold)
    assert want["structured"] and G != 4
    assert choice["num_groups"] == G and choice["epoch"] == 1 and choice["structured"]
    assert np.allclose(choice["eigenvalues"], want["eigenvalues"], rtol=0, atol=1e-12)
    assert choice["null_max_gaps"] == pytest.approx(want["null_max_gaps"], abs=1e-12)
    assert info["num_groups"] == G and len(info["groups"]) == G
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["groups"] == info["groups"]
    assert history[0]["groups"] == want_groups and history[0]["ari_vs_previous"] is None
    ari = ari_by_pairs(labels(history[0]["groups"]), labels(history[1]["groups"]))
    assert history[1]["ari_vs_previous"] == pytest.approx(ari, abs=1e-12)
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert [e.get("regroup_ari") for e in log] == [None, None, history[1]["ari_vs_previous"]]
    assert "alpha_mean" not in log[0] and all(len(e["alpha_mean"]) == G for e in log[1:])
    saved = ckpt(out)
    assert saved["args"]["num_groups"] == G and saved["args"]["max_groups"] == 5
    assert saved["groups_info"] == info

    # the cut run equals the uninterrupted one
    a, b = ckpt(tmp_path / "ref")["model"], saved["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "ref" / "groups.json")) == info
    ref_log = [json.loads(line) for line in open(tmp_path / "ref" / "log.txt")]
    strip = lambda e: {k: v for k, v in e.items() if k not in TIMING}
    assert [strip(e) for e in ref_log] == [strip(e) for e in log]


def parse(*argv):
    args = T.get_args_parser().parse_args(list(argv))
    args.world_size = 1
    T.fill_defaults(args)
    return args


def test_auto_flags_are_checked():
    assert parse("--num-groups", "auto").num_groups == "auto"
    assert parse("--num-groups", "7").num_groups == 7
    assert parse("--num-groups", "auto", "--grouping", "none").num_groups == "auto"  # unused, as any G there
    with pytest.raises(SystemExit):
        T.get_args_parser().parse_args(["--num-groups", "four"])
    for argv, words in [(["--num-groups", "auto", "--grouping", "random"], "--grouping random"),
                        (["--num-groups", "auto", "--grouping", "count"], "--num-groups N"),
                        (["--max-groups", "5"], "--max-groups bounds --num-groups auto only"),
                        (["--num-groups", "auto", "--max-groups", "1"], "--max-groups 1 must be at least 2")]:
        with pytest.raises(data_lt.UserError, match=words) as e:
            parse(*argv)
        assert "\n" not in str(e.value)
    # against the classes that have training images: default min(8, K // 2), at most K - 1
    args = parse("--num-groups", "auto")
    T.check_auto_groups(args, 10)
    assert args.max_groups == 5
    args = parse("--num-groups", "auto")
    T.check_auto_groups(args, 100)
    assert args.max_groups == 8
    args = parse("--num-groups", "auto", "--max-groups", "9")
    T.check_auto_groups(args, 10)
    assert args.max_groups == 9
    with pytest.raises(data_lt.UserError, match="--max-groups 10 must be at most 9"):
        T.check_auto_groups(parse("--num-groups", "auto", "--max-groups", "10"), 10)
    with pytest.raises(data_lt.UserError, match="at least 4 classes"):
        T.check_auto_groups(parse("--num-groups", "auto"), 3)


def test_bad_max_groups_is_one_line(tmp_path):
    r = train(*TINY, "--num-groups", "auto", "--max-groups", "10", "--epochs", "1", "--output-dir", str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["train.py: error: --max-groups 10 must be at most 9: the eigengap at G "
                                             "needs G + 1 of the 10 classes of synthetic-lt that have training images"]
