"""GAC sampler of gbg.py on a CIFAR-100-LT-like label list: coverage, completion sizes, the
completion distribution (chi-square against P_j computed here from the formula), determinism,
sharding across replicas, and the cap on top-ups."""

import math

import numpy as np
import pytest
from scipy.stats import chisquare

import gbg

COUNTS = np.array([int(500 * 0.01 ** (k / 99)) for k in range(100)])  # IF 100: 500 ... 5
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(100), COUNTS))
GROUPS = gbg.count_groups(COUNTS, 8)  # tail groups are often missing from a batch of 128
B, EPOCHS = 128, 20


def reference_probs(counts, groups, rho, lam):
    """P_j from the formula, one class at a time (see gac_class_probs for our reading of beta)."""
    present = [c for c in counts if c > 0]
    span = math.log(max(present) / min(present))
    P = [0.0] * len(counts)
    for g in set(groups.tolist()):
        members = [j for j in range(len(counts)) if groups[j] == g and counts[j] > 0]
        n = [counts[j] for j in members]
        delta = math.log(max(n) / min(n)) / span if span > 0 else 0.0
        beta = rho + lam * delta
        p = {j: (1 - beta) / (1 - beta ** counts[j]) for j in members}
        for j in members:
            P[j] = p[j] / sum(p.values())
    return np.array(P)


@pytest.fixture(scope="module")
def epochs():
    sampler = gbg.GACBatchSampler(LABELS, GROUPS, B, seed=3)
    return sampler, [sampler.epoch_batches(e) for e in range(EPOCHS)]


# --- P_j ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho, lam", [(0.9999, 1e-5), (0.99, 0.009), (0.5, 0.4), (0.0, 0.0)])
def test_class_probs_match_formula(rho, lam):
    counts = COUNTS.copy()
    counts[[13, 57]] = 0  # classes without samples get probability 0
    got = gbg.gac_class_probs(counts, GROUPS, rho=rho, lam=lam)
    want = reference_probs(counts, GROUPS, rho, lam)
    assert np.allclose(got, want, rtol=1e-9, atol=0)
    assert got[13] == 0 and got[57] == 0
    for g in range(8):
        assert abs(got[GROUPS == g].sum() - 1) < 1e-12


def test_class_probs_balanced_and_inverse_frequency_limits():
    groups = np.repeat(np.arange(4), 5)
    assert np.allclose(gbg.gac_class_probs(np.full(20, 37), groups), 0.2)  # delta = 0: uniform
    counts = np.arange(1, 21) * 10
    inv = 1.0 / counts
    inv = inv / np.array([inv[groups == g].sum() for g in groups])
    assert np.allclose(gbg.gac_class_probs(counts, groups), inv, rtol=1e-2)  # beta ~ 1


def test_class_probs_reject_beta_one():
    with pytest.raises(ValueError, match="beta=.* must be in"):
        gbg.gac_class_probs(COUNTS, GROUPS, rho=0.99999, lam=1e-4)


# --- the sampler ----------------------------------------------------------------------------------

def test_batches_cover_groups_and_epoch(epochs):
    sampler, all_batches = epochs
    fill = math.ceil(0.1 * B)
    completed = 0
    for batches in all_batches:
        assert len(batches) == len(sampler)
        base = np.concatenate([b for b, _ in batches])
        assert np.array_equal(np.sort(base), np.arange(LABELS.size))  # each sample exactly once
        for b, c in batches[:-1]:
            assert b.size == B
        for b, c in batches:
            missing = np.setdiff1d(np.arange(8), GROUPS[LABELS[b]])
            filled, sizes = np.unique(GROUPS[LABELS[c]], return_counts=True)
            assert np.array_equal(filled, missing)  # exactly the missing groups are topped up
            assert np.all(sizes == fill)  # each with ceil(fill * B) samples
            assert np.array_equal(np.union1d(GROUPS[LABELS[b]], filled), np.arange(8))
            completed += filled.size
    assert completed > 1000  # completions really happened


def test_completions_follow_class_probs(epochs):
    _, all_batches = epochs
    P = reference_probs(COUNTS, GROUPS, 0.9999, 1e-5)
    drawn = np.concatenate([c for batches in all_batches for _, c in batches])
    class_hits = np.bincount(LABELS[drawn], minlength=100)
    tested = 0
    for g in range(8):
        members = np.flatnonzero(GROUPS == g)
        total = class_hits[members].sum()
        expected = total * P[members]
        if total == 0 or expected.min() < 5:
            continue
        assert chisquare(class_hits[members], expected).pvalue > 1e-3, g
        tested += 1
    assert tested >= 3
    # within a class every sample is equally likely: per-sample chi-square on the tail group
    tail = np.flatnonzero(GROUPS[LABELS] == 7)
    sample_hits = np.bincount(drawn, minlength=LABELS.size)[tail]
    expected = sample_hits.sum() * P[LABELS[tail]] / COUNTS[LABELS[tail]]
    assert expected.min() >= 5
    assert chisquare(sample_hits, expected).pvalue > 1e-3


def test_deterministic_given_seed_and_epoch(epochs):
    sampler, all_batches = epochs
    again = gbg.GACBatchSampler(LABELS, GROUPS, B, seed=3)
    again.set_epoch(5)
    yielded = list(again)
    assert yielded == [b.tolist() + c.tolist() for b, c in all_batches[5]]
    assert all(type(i) is int for i in yielded[0])
    assert yielded != list(iter_epoch(again, 6))  # epochs differ, in the permutation too
    assert not np.array_equal(again.epoch_batches(6)[0][0], all_batches[5][0][0])
    other = gbg.GACBatchSampler(LABELS, GROUPS, B, seed=4)
    assert list(iter_epoch(other, 5)) != yielded  # seeds differ


def iter_epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return iter(sampler)


@pytest.mark.parametrize("replicas", [2, 8])
def test_replicas_share_the_one_process_batches(replicas):
    """Every replica builds the same global batch (base and top-ups) and takes its share: the
    union of the replicas' t-th batches is the one-process t-th batch, top-ups included."""
    b = B // replicas
    one = gbg.GACBatchSampler(LABELS, GROUPS, B, seed=1).epoch_batches(2)
    ranks = [gbg.GACBatchSampler(LABELS, GROUPS, b, seed=1, num_replicas=replicas, rank=r).epoch_batches(2)
             for r in range(replicas)]
    assert all(len(r) == len(one) for r in ranks)
    bases = [np.concatenate([base for base, _ in r]) for r in ranks]
    pad = -LABELS.size % replicas
    assert pad > 0  # some indices are repeated to even out the replicas
    assert all(x.size == (LABELS.size + pad) // replicas for x in bases)
    everything = np.concatenate(bases)
    assert np.array_equal(np.unique(everything), np.arange(LABELS.size))  # cover the epoch
    assert everything.size - np.unique(everything).size == pad  # disjoint but for the wrap-around pad
    for t in range(len(one)):
        base = np.concatenate([r[t][0] for r in ranks])
        top_up = np.concatenate([r[t][1] for r in ranks])
        if t < len(one) - 1:  # the last batch holds the pad
            assert np.array_equal(np.sort(base), np.sort(one[t][0]))
            assert np.array_equal(np.sort(top_up), np.sort(one[t][1]))
        # the global batch holds every group; top-ups of ceil(0.1 B) per missing group
        missing = np.setdiff1d(np.arange(8), GROUPS[LABELS[base]])
        assert np.array_equal(np.union1d(GROUPS[LABELS[base]], GROUPS[LABELS[top_up]]), np.arange(8))
        assert top_up.size == math.ceil(0.1 * B) * missing.size
        assert max(r[t][0].size for r in ranks) - min(r[t][0].size for r in ranks) <= 1


def test_top_ups_per_epoch_do_not_grow_with_replicas():
    """Deciding top-ups on each replica's own share (32 samples of a global 256 on 8 replicas)
    would miss tail groups far more often: here the top-ups an epoch draws are the same for 1 and
    8 replicas, because the decision is taken on the global batch."""
    def top_ups(replicas):
        return sum(c.size for r in range(replicas) for _, c in
                   gbg.GACBatchSampler(LABELS, GROUPS, 256 // replicas, seed=0, num_replicas=replicas,
                                       rank=r).epoch_batches(0))
    assert top_ups(8) == top_ups(1) > 0


@pytest.mark.parametrize("batch_size, replicas, drop_last, frac, fill", [
    (128, 1, False, 0.1, 13), (128, 1, True, 0.1, 13), (100, 3, False, 0.1, 30), (100, 3, True, 0.1, 30),
    (50, 1, False, 0.14, 7)])  # fill = ceil(frac * R * B) by hand; 0.14 * 50 is 7.000000000000001 in floats
def test_len_matches_yield(batch_size, replicas, drop_last, frac, fill):
    for rank in range(replicas):
        sampler = gbg.GACBatchSampler(LABELS, GROUPS, batch_size, fill=frac, num_replicas=replicas,
                                      rank=rank, drop_last=drop_last)
        batches = sampler.epoch_batches(0)
        assert len(list(sampler)) == len(batches) == len(sampler)
        if drop_last:
            assert all(b.size == batch_size for b, _ in batches)
        sizes = np.concatenate([np.unique(GROUPS[LABELS[c]], return_counts=True)[1]
                                for _, c in sampler.global_batches(0)])
        assert sizes.size > 0 and np.all(sizes == fill)


def test_refuses_top_ups_many_times_the_batch():
    """Every class its own group (the MOO ablation) on CIFAR-100-LT: a batch of 128 could grow by
    99 x 13 samples. The sampler refuses, naming the sizes; 8 groups (at most 7 x 13) pass."""
    with pytest.raises(ValueError, match=r"99 x 13 = 1287 top-up samples to a batch of 128"):
        gbg.GACBatchSampler(LABELS, np.arange(100), B)
    gbg.GACBatchSampler(LABELS, GROUPS, B)
    gbg.GACBatchSampler(LABELS, np.arange(100), B, max_growth=20.0)  # the caller may allow more


def test_single_group_is_plain_shuffling():
    sampler = gbg.GACBatchSampler(LABELS, np.zeros(100, dtype=np.int64), B)
    batches = sampler.epoch_batches(0)
    assert all(c.size == 0 for _, c in batches)
    assert np.array_equal(np.sort(np.concatenate([b for b, _ in batches])), np.arange(LABELS.size))


def test_input_errors():
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 50\)"):
        gbg.GACBatchSampler(LABELS, GROUPS[:50], B)
    groups = GROUPS.copy()
    groups[groups == 3] = 8  # group 3 is left without classes
    with pytest.raises(ValueError, match="group 3 has no training samples; regroup"):
        gbg.GACBatchSampler(LABELS, groups, B)
    with pytest.raises(ValueError, match="group 7 has no training samples"):
        gbg.GACBatchSampler(LABELS[GROUPS[LABELS] != 7], GROUPS, B)
    with pytest.raises(ValueError, match="beta"):
        gbg.GACBatchSampler(LABELS, GROUPS, B, rho=1.0)
