"""Tests of the MOO half of GBG: min-norm weights, group losses, the MGDA step."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize

import gbg
from gbg import group_losses, mgda_backward, min_norm_weights, step_diagnostic

torch.set_num_threads(1)
NORMALIZE = ["none", "l2", "loss", "loss+"]


# ---------------------------------------------------------------- min_norm_weights

def _random_gradients(rng, case, G):
    """Rows are gradient vectors; each case is one of the shapes MGDA meets in practice."""
    D = int(rng.integers(G, 3 * G + 2))
    X = rng.standard_normal((G, D))
    if case == "shared":  # a common component: the optimum is an interior point of a face
        X += rng.uniform(0, 3) * rng.standard_normal(D)
    elif case == "rank_deficient":  # G > dim
        X = rng.standard_normal((G, int(rng.integers(1, G)))) + rng.uniform(0, 2)
    elif case == "collinear":
        signs = np.ones(G) if rng.random() < 0.5 else rng.choice([-1.0, 1.0], G)
        X = np.outer(signs * rng.uniform(0.1, 10, G), rng.standard_normal(D))
    elif case == "near_collinear":
        X = np.outer(rng.uniform(0.1, 10, G), rng.standard_normal(D)) + 1e-7 * X
    elif case == "duplicated":
        X += rng.standard_normal(D)
        X[rng.integers(0, G, G // 2)] = X[rng.integers(0, G, G // 2)]
    elif case == "zero_rows":
        X += rng.standard_normal(D)
        X[rng.random(G) < 0.3] = 0.0
    elif case == "one_zero":
        X += 2 * rng.standard_normal(D)
        X[int(rng.integers(G))] = 0.0
    elif case == "scaled":
        X = (X + rng.standard_normal(D)) * 10.0 ** rng.uniform(-8, 8)
    elif case == "mixed_scales":
        X = (X + rng.standard_normal(D)) * 10.0 ** rng.uniform(-8, 8, (G, 1))
    return X


CASES = ["full", "shared", "rank_deficient", "collinear", "near_collinear", "duplicated",
         "zero_rows", "one_zero", "scaled", "mixed_scales"]


def _slsqp(M):
    """Independent reference: scipy's SLSQP on the simplex (on M / max diag, as it is unscaled)."""
    G, s = M.shape[0], M.diagonal().max()
    if s == 0:
        return 0.0
    A = M / s
    res = minimize(lambda a: a @ A @ a, np.full(G, 1.0 / G), jac=lambda a: 2 * A @ a,
                   method="SLSQP", bounds=[(0, 1)] * G,
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1,
                                 "jac": lambda a: np.ones_like(a)}],
                   options={"ftol": 1e-16, "maxiter": 500})
    a = np.clip(res.x, 0, None)
    a /= a.sum()
    return float(a @ M @ a)


def _assert_kkt(M, a, tol=1e-9):
    """Optimality certificate of min a^T M a on the simplex, with tol relative to the Gram scale."""
    s = max(M.diagonal().max(), 1e-300)
    assert np.all(np.isfinite(a)) and a.min() >= 0 and abs(a.sum() - 1) < tol
    obj = a @ M @ a
    gaps = (M @ a - obj) / s
    assert gaps.min() >= -tol, f"a coordinate off the support would lower the norm: {gaps.min()}"
    assert np.max(a * np.abs(gaps)) <= tol, "gradient gap not zero on the support"


def test_min_norm_matches_slsqp_and_kkt_500_cases():
    rng = np.random.default_rng(0)
    for k in range(500):
        case, G = CASES[k % len(CASES)], int(rng.integers(2, 33))
        X = _random_gradients(rng, case, G)
        M = X @ X.T
        a = min_norm_weights(torch.tensor(M)).numpy()
        _assert_kkt(M, a)
        # the active-set polish alone (from the best vertex) also reaches the optimum
        _assert_kkt(M, min_norm_weights(torch.tensor(M), max_iter=0).numpy())
        ours, s = a @ M @ a, M.diagonal().max()
        assert ours <= M.diagonal().min() * (1 + 1e-12) + 1e-300, "worse than the best single gradient"
        assert ours <= _slsqp(M) * (1 + 1e-6) + 1e-12 * s, (case, G)
        if case in ("one_zero", "zero_rows") and (M.diagonal() == 0).any():
            assert ours == 0.0
        if case == "collinear" and (X @ X[0] < 0).any():
            assert ours <= 1e-12 * s  # opposite directions: 0 is in the hull


def _enumerated_optimum(M):
    """Exact reference for G <= 10: the optimum is the affine minimiser (KKT system) on its
    support, and that point is feasible; every feasible affine minimiser is a point of the
    simplex. So the optimum is the smallest objective over the feasible ones, of all 2^G - 1
    supports."""
    G, best = M.shape[0], np.inf
    for mask in range(1, 2 ** G):
        S = [i for i in range(G) if mask >> i & 1]
        r = len(S)
        A = np.zeros((r + 1, r + 1))
        A[:r, :r], A[:r, r], A[r, :r] = M[np.ix_(S, S)], 1.0, 1.0
        try:
            x = np.linalg.solve(A, np.eye(r + 1)[r])[:r]
        except np.linalg.LinAlgError:
            continue
        if x.min() >= 0:
            best = min(best, x @ M[np.ix_(S, S)] @ x)
    return best


def test_min_norm_relative_to_the_optimum_when_norms_span_eight_orders():
    """Gradient norms from 1e-4 to 1e4: the optimum can lie 16 orders below the largest squared
    norm, so a stopping rule relative to that scale stops far above it. Full-rank cases (the
    optimum is then > 0 and the relative error defined): within 1e-6 of the enumerated optimum."""
    rng = np.random.default_rng(3)
    for _ in range(150):
        G = int(rng.integers(3, 11))
        X = rng.standard_normal((G, G + int(rng.integers(0, 30))))
        X *= 10.0 ** rng.uniform(-4, 4, (G, 1)) / np.linalg.norm(X, axis=1, keepdims=True)
        M = X @ X.T
        a = min_norm_weights(torch.tensor(M)).numpy()
        opt = _enumerated_optimum(M)
        assert a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        assert a @ M @ a <= opt * (1 + 1e-6), (G, a @ M @ a / opt - 1)
    # wider spans (1e-8 .. 1e8, and rank-deficient): finite, never worse than the best single one
    for _ in range(150):
        G = int(rng.integers(3, 11))
        X = rng.standard_normal((G, int(rng.integers(1, 2 * G))))
        X *= 10.0 ** rng.uniform(-8, 8, (G, 1)) / np.linalg.norm(X, axis=1, keepdims=True)
        M = X @ X.T
        a = min_norm_weights(torch.tensor(M)).numpy()
        assert np.all(np.isfinite(a)) and a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        assert a @ M @ a <= M.diagonal().min() * (1 + 1e-12)


def test_min_norm_g1_g2_closed_form_and_degenerate():
    assert min_norm_weights(torch.tensor([[3.0]])).tolist() == [1.0]
    assert min_norm_weights(torch.zeros(1, 1)).tolist() == [1.0]
    rng = np.random.default_rng(1)
    grid = np.linspace(0, 1, 200001)
    vecs = [rng.standard_normal((2, 5)) for _ in range(20)]
    u = rng.standard_normal(5)
    vecs += [np.stack([u, u]), np.stack([u, 2 * u]), np.stack([u, -3 * u]), np.zeros((2, 5)),
             np.stack([u, 0 * u]), np.stack([1e-8 * u, 1e8 * rng.standard_normal(5)])]
    for X in vecs:
        M = X @ X.T
        a = min_norm_weights(torch.tensor(M)).numpy()
        assert np.all(np.isfinite(a)) and a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        # brute force over the segment between the two gradients
        objs = (grid[:, None] * X[0] + (1 - grid[:, None]) * X[1]) ** 2
        objs = objs.sum(1)
        best = objs.min()
        assert a @ M @ a <= best * (1 + 1e-9) + 1e-14 * M.diagonal().max()
        if (X[0] - X[1]) @ (X[0] - X[1]) > 1e-6 * M.diagonal().max():  # unique minimiser
            assert abs(a[0] - grid[objs.argmin()]) <= 2e-5 + 1e-3 * math.sqrt(best / M.max())


def test_min_norm_dtype_device_nonfinite_and_large_g():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((6, 4))
    a32 = min_norm_weights(torch.tensor(X @ X.T, dtype=torch.float32))
    assert a32.dtype == torch.float32 and torch.isfinite(a32).all()
    _assert_kkt(X @ X.T, a32.double().numpy(), tol=1e-6)
    bad = torch.tensor(X @ X.T)
    bad[1, 2] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        assert torch.isfinite(min_norm_weights(bad)).all()
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(torch.ones(2, 3))
    for G, D in [(400, 30), (300, 2000)]:  # large G, low rank and full rank
        X = rng.standard_normal((G, D)) + 0.3 * rng.standard_normal(D)
        M = X @ X.T
        _assert_kkt(M, min_norm_weights(torch.tensor(M)).numpy())


# ---------------------------------------------------------------- group_losses

def _loop_group_losses(logits, targets, class_to_group, G, mode, counts):
    """Per-sample loop reference, written from the definition."""
    members = {}
    for b in range(len(targets)):
        y = int(targets[b])
        loss = torch.logsumexp(logits[b], 0) - logits[b, y]
        members.setdefault(int(class_to_group[y]), {}).setdefault(y, []).append(loss)
    out = []
    for g in range(G):
        classes = {c: ls for c, ls in members.get(g, {}).items()}
        if mode == "sample":
            n = sum(int(counts[c]) for c in range(len(counts)) if int(class_to_group[c]) == g)
            out.append(sum(sum(ls) for ls in classes.values()) / n if classes else None)
        else:
            n = sum(1 for c in range(len(counts)) if int(class_to_group[c]) == g and counts[c] > 0)
            out.append(sum(sum(ls) / int(counts[c]) for c, ls in classes.items()) / n
                       if classes else None)
    return out


@pytest.mark.parametrize("mode", ["class", "sample"])
def test_group_losses_against_loop(mode):
    g = torch.Generator().manual_seed(3)
    K, G, B = 7, 4, 40
    class_to_group = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    logits = torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0] * 20 + [1] * 5 + [2] * 8 + [4] * 7)  # groups 2, 3 absent
    losses, present = group_losses(logits, targets, class_to_group, G, mode=mode)
    ref = _loop_group_losses(logits, targets, class_to_group, G, mode, torch.bincount(targets, minlength=K))
    assert present.tolist() == [r is not None for r in ref] == [True, True, False, False]
    assert torch.allclose(losses[present], torch.stack([r for r in ref if r is not None]))
    w = torch.randn(2, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((w * losses[present]).sum(), logits, retain_graph=True)[0]
    theirs = torch.autograd.grad(w[0] * ref[0] + w[1] * ref[1], logits)[0]
    assert torch.allclose(ours, theirs)
    for i in (2, 3):  # absent: zero, connected, zero gradient
        assert losses[i].item() == 0.0 and losses[i].requires_grad
        assert torch.autograd.grad(losses[i], logits, retain_graph=True)[0].abs().max() == 0


@pytest.mark.parametrize("mode", ["class", "sample"])
def test_group_losses_global_counts_split(mode):
    g = torch.Generator().manual_seed(4)
    K, G, B = 6, 3, 30
    class_to_group = torch.tensor([2, 0, 1, 0, 2, 1])
    logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    targets = torch.randint(0, K - 1, (B,), generator=g)  # class 5 never drawn
    targets[:3] = 4  # class 4 only in the first half
    whole, present = group_losses(logits, targets, class_to_group, G, mode=mode)
    counts = torch.bincount(targets, minlength=K)
    parts = [group_losses(logits[s], targets[s], class_to_group, G, mode=mode, class_counts=counts)
             for s in (slice(0, 13), slice(13, B))]
    assert torch.allclose(parts[0][0] + parts[1][0], whole)
    assert parts[0][1].tolist() == parts[1][1].tolist() == present.tolist()
    with pytest.raises(ValueError, match="class_counts"):
        group_losses(logits, targets, class_to_group, G, class_counts=torch.zeros(K, dtype=torch.long))
    with pytest.raises(ValueError, match="mode"):
        group_losses(logits, targets, class_to_group, G, mode="group")


# ---------------------------------------------------------------- mgda_backward

def _mlp(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 6)).to(dtype)


def _problem(seed=5, B=48):
    """A long-tailed toy batch: 6 classes in 3 groups, group sizes 36 / 9 / 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 5, generator=g, dtype=torch.float64)
    y = torch.cat([torch.randint(0, 2, (36,), generator=g), torch.randint(2, 4, (9,), generator=g),
                   torch.randint(4, 6, (3,), generator=g)])
    return x, y, torch.tensor([0, 0, 1, 1, 2, 2])


def _reference_grads(model, x, y, c2g, mode="class"):
    """g_i by separate .backward() calls on a fresh copy of the model."""
    out = []
    for i in range(3):
        m = copy.deepcopy(model)
        m.zero_grad(set_to_none=True)
        group_losses(m(x), y, c2g, 3, mode=mode)[0][i].backward()
        out.append([p.grad.clone() for p in m.parameters()])
    losses = group_losses(model(x), y, c2g, 3, mode=mode)[0].detach()
    return out, losses


def _norms(normalize, grads_flat, losses):
    l2 = grads_flat.norm(dim=1)
    return {"none": torch.ones_like(losses), "l2": l2, "loss": losses, "loss+": losses * l2}[normalize]


def _flat(grads):
    return torch.cat([t.reshape(-1) for t in grads])


def _weights_ref(alpha, n, update):
    """The update rules as documented: the weights of the raw g_i in d."""
    return {"scaled": (alpha / n) / (alpha / n).sum(), "raw": alpha, "normalized": alpha / n}[update]


UPDATES = ["scaled", "raw", "normalized"]


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_mgda_backward_exact_matches_separate_backwards(normalize, update):
    model = _mlp(0)
    x, y, c2g = _problem()
    ref, ref_losses = _reference_grads(model, x, y, c2g)
    flat = torch.stack([_flat(g) for g in ref])
    n = _norms(normalize, flat, ref_losses)
    alpha_ref = min_norm_weights((flat @ flat.T) / torch.outer(n, n))
    w_ref = _weights_ref(alpha_ref, n, update)
    d_ref = [sum(w_ref[i] * ref[i][k] for i in range(3)) for k in range(4)]

    params = list(model.parameters())
    before = torch.randn_like(params[0])
    params[0].grad = before.clone()  # accumulation: p.grad += d, like .backward()
    losses, present = group_losses(model(x), y, c2g, 3)
    out = mgda_backward(losses[present], params, normalize=normalize, update=update)
    assert torch.allclose(out["alpha"], alpha_ref.to(out["alpha"]), atol=1e-9)
    assert torch.allclose(out["weights"], w_ref, atol=1e-9)
    assert torch.allclose(out["gram"], (flat @ flat.T) / torch.outer(n, n))
    assert torch.allclose(params[0].grad, before + d_ref[0], atol=1e-10)
    for p, d in zip(params[1:], d_ref[1:]):
        assert torch.allclose(p.grad, d, atol=1e-10)
    diag = step_diagnostic(out["gram"], out["alpha"], losses)
    assert min(diag["cos"]) >= -1e-9 and diag["d_norm"] > 0
    d_min = sum(alpha_ref[i] / n[i] * flat[i] for i in range(3))  # the min-norm point itself
    assert math.isclose(diag["d_norm"], d_min.norm().item(), rel_tol=1e-9)
    assert np.allclose(diag["cos"], F.cosine_similarity(flat, d_min[None], dim=1).numpy(), atol=1e-9)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_update_size_equal_gradients_give_that_gradient(normalize):
    """L_i = L + i: the same gradient g for every group, different loss values. The default rule
    gives d = g whatever the normaliser (so a GBG step at lr eta is a CE-sized step), the release's
    rule too (alpha sums to 1); the min-norm point itself has the size of g / n."""
    model = _mlp(4)
    x, y, _ = _problem(4)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    g = _flat(p.grad for p in ref.parameters())
    for update in UPDATES:
        model.zero_grad(set_to_none=True)
        L = F.cross_entropy(model(x), y)
        mgda_backward([L, L + 1.0, L + 3.0], model.parameters(), normalize=normalize, update=update)
        d = _flat(p.grad for p in model.parameters())
        if update != "normalized":
            assert torch.allclose(d, g, rtol=1e-9, atol=1e-12), update
        elif normalize == "l2":
            assert math.isclose(d.norm().item(), 1.0, rel_tol=1e-9)


def test_scaled_keeps_descent_raw_does_not():
    """A planted pair: g_1 large, g_2 small, at 120 degrees. The min-norm point of the unit vectors
    bisects them; the scaled update is a positive multiple of it (cos >= 0 with both), while
    alpha applied to the raw gradients points along g_1 and raises L_2 (cos(d, g_2) < 0)."""
    theta = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    u1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    u2 = torch.tensor([math.cos(2.1), math.sin(2.1)], dtype=torch.float64)
    for update, descends in (("scaled", True), ("raw", False), ("normalized", True)):
        theta.grad = None
        L1, L2 = 100.0 * (u1 @ theta), 0.01 * (u2 @ theta)  # gradients 100 u1 and 0.01 u2
        mgda_backward([L1, L2], [theta], normalize="l2", update=update)
        cos = [F.cosine_similarity(theta.grad, u, dim=0).item() for u in (u1, u2)]
        assert (min(cos) >= -1e-12) == descends, (update, cos)


def test_gram_subset_partial_step_and_frozen():
    """Gram over the last layer only (--moo-gram / --moo-grad last): alpha from that Gram, the
    update over every parameter. The partial step (G backwards stopping at the last layer, then
    one full backward of sum w_i L_i) gives the same alpha, weights and p.grad as the exact step
    with the same gram_params."""
    model = _mlp(1)
    x, y, c2g = _problem(6)
    ref, ref_losses = _reference_grads(model, x, y, c2g)
    sub = torch.stack([_flat(g[2:]) for g in ref])
    full = torch.stack([_flat(g) for g in ref])
    n = sub.norm(dim=1)
    alpha_ref = min_norm_weights((sub @ sub.T) / torch.outer(n, n))
    w_ref = _weights_ref(alpha_ref, n, "scaled")
    d_ref = w_ref @ full
    last = [model[2].weight, model[2].bias]
    results = {}
    for name, step in (("exact", lambda L, P: mgda_backward(L, P, gram_params=last)),
                       ("partial", lambda L, P: gbg.mgda_backward_partial(L, P, last))):
        model.zero_grad(set_to_none=True)
        out = step(list(group_losses(model(x), y, c2g, 3)[0]), model.parameters())
        assert torch.allclose(out["alpha"], alpha_ref, atol=1e-9), name
        assert torch.allclose(_flat(p.grad for p in model.parameters()), d_ref, atol=1e-10), name
        results[name] = out
    model[0].bias.requires_grad_(False)  # frozen: skipped, no grad created
    model.zero_grad(set_to_none=True)
    gbg.mgda_backward_partial(list(group_losses(model(x), y, c2g, 3)[0]), model.parameters(), last)
    assert model[0].bias.grad is None and model[0].weight.grad is not None
    for step in (lambda L: mgda_backward(L, last, gram_params=[model[0].weight]),
                 lambda L: gbg.mgda_backward_partial(L, last, [model[0].weight])):
        with pytest.raises(ValueError, match="subset"):
            step(list(group_losses(model(x), y, c2g, 3)[0]))


def test_weighted_backward_and_graph_retention():
    model = _mlp(2)
    x, y, c2g = _problem(3)
    ref, _ = _reference_grads(model, x, y, c2g)
    w = [0.5, -2.0, 3.0]
    params = list(model.parameters())
    params[1].grad = torch.ones_like(params[1])
    losses = group_losses(model(x), y, c2g, 3)[0]
    gbg.weighted_backward(list(losses), w, params, retain_graph=True)
    for k, p in enumerate(params):
        want = sum(w[i] * ref[i][k] for i in range(3)) + (1.0 if k == 1 else 0.0)
        assert torch.allclose(p.grad, want, atol=1e-12)
    losses.sum().backward()  # graph kept

    # G = 1: the update is g_1 under every rule but "normalized" (g_1 / n_1); graph freed by default
    for normalize in NORMALIZE:
        for update in UPDATES:
            model.zero_grad(set_to_none=True)
            L = group_losses(model(x), y, c2g, 3)[0][1]
            out = mgda_backward([L], model.parameters(), normalize=normalize, update=update, retain_graph=True)
            assert out["alpha"].tolist() == [1.0]
            n = _norms(normalize, _flat(ref[1])[None], L.detach()[None])[0]
            want = ref[1][2] / n if update == "normalized" else ref[1][2]
            assert torch.allclose(model[2].weight.grad, want)
            L.backward()  # graph kept
    L = group_losses(model(x), y, c2g, 3)[0][0]
    mgda_backward([L], model.parameters())
    with pytest.raises(RuntimeError):
        L.backward()


def test_bad_arguments_raise_one_clear_error():
    model = _mlp(2)
    x, y, c2g = _problem(3)
    L = list(group_losses(model(x), y, c2g, 3)[0])
    with pytest.raises(ValueError, match="normalize"):
        mgda_backward(L, model.parameters(), normalize="l1")
    with pytest.raises(ValueError, match="update"):
        mgda_backward(L, model.parameters(), update="release")
    with pytest.raises(ValueError, match="no losses"):
        mgda_backward([], model.parameters())


def test_absent_group_makes_the_step_zero():
    """Why the caller must drop absent groups: a zero gradient is the min-norm point."""
    model = _mlp(2)
    x, y, c2g = _problem(7)
    losses, present = group_losses(model(x[:36]), y[:36], c2g, 3)
    assert present.tolist() == [True, False, False]
    with pytest.warns(UserWarning, match="zero gradient"):
        mgda_backward(list(losses), model.parameters(), update="normalized")
    assert all(p.grad.abs().max() == 0 for p in model.parameters())


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_pareto_descent_every_group_improves(normalize):
    """Conflicting groups (two head groups on the same inputs with different labels, one small
    group): the naive mean-loss step raises some group's loss; the MGDA step lowers every one."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(88, 5, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(40, dtype=torch.long),
                   torch.full((8,), 2)])
    x[40:80] = x[:40] + 0.05 * torch.randn(40, 5, generator=g, dtype=torch.float64)  # same inputs, other label
    c2g = torch.tensor([0, 1, 2, 2, 2, 2])
    lr = 1e-3

    def step(direction):
        model = _mlp(3)
        before = group_losses(model(x), y, c2g, 3, mode="sample")[0].detach()
        direction(model)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        return before, group_losses(model(x), y, c2g, 3, mode="sample")[0].detach()

    before, after = step(lambda m: F.cross_entropy(m(x), y).backward())
    assert (after > before).any(), "the toy problem must have conflicting groups"
    before, after = step(lambda m: mgda_backward(
        list(group_losses(m(x), y, c2g, 3, mode="sample")[0]), m.parameters(), normalize=normalize))
    assert (after < before).all(), (before, after)


def test_partial_gram_is_a_real_gram():
    """Unlike the Gram of the gradients w.r.t. the features (diagonal when each group's loss
    depends on its own samples' rows only), the Gram over a trailing layer has off-diagonal
    entries, so alpha is a real min-norm compromise, not a fixed re-weighting."""
    model = _mlp(5)
    x, y, c2g = _problem(5)
    z = model[1](model[0](x))
    losses = group_losses(model[2](z), y, c2g, 3)[0]
    Z = torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0].reshape(-1) for i in range(3)])
    feature_gram = Z @ Z.T
    assert torch.count_nonzero(feature_gram - torch.diag(feature_gram.diagonal())) == 0
    out = gbg.mgda_backward_partial(list(losses), model.parameters(), [model[2].weight, model[2].bias])
    off = out["gram"] - torch.diag(out["gram"].diagonal())
    assert off.abs().max() > 1e-3


# ---------------------------------------------------------------- distributed (gloo, 2 processes)

def _dist_batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    # group 2 (classes 4, 5) lives only in the second half; class 6 / group 3 is absent
    y = torch.cat([torch.randint(0, 4, (16,), generator=g), torch.randint(0, 6, (16,), generator=g)])
    return x, y, torch.tensor([0, 0, 1, 1, 2, 2, 3])


def _dist_runs(x, y, c2g, class_counts, process_group):
    """Each (mode, normalize) step on a fresh copy of the same net; returns alpha and grads."""
    out = {}
    for mode in ("exact", "partial", "features", "weighted"):
        for normalize in ("none", "loss+"):
            torch.manual_seed(12)
            net = nn.ModuleDict({"body": nn.Sequential(nn.Linear(5, 8), nn.Tanh()),
                                 "head": nn.Linear(8, 7)}).double()
            z = net["body"](x)
            losses, present = group_losses(net["head"](z), y, c2g, 4, class_counts=class_counts)
            params, alpha = list(net.parameters()), torch.zeros(1)
            kw = dict(normalize=normalize, process_group=process_group)
            if mode == "exact":
                alpha = mgda_backward(losses[present], params, **kw)["alpha"]
            elif mode == "features":  # each rank holds its own rows of z: the z-Grams are summed
                alpha = gbg.mgda_backward_features(losses[present], z, params, gram_params=net["head"].parameters(),
                                                   **kw)["alpha"]
            elif mode == "partial":
                alpha = gbg.mgda_backward_partial(losses[present], params, list(net["head"].parameters()), **kw)["alpha"]
            else:
                gbg.weighted_backward(losses[present], [0.3, 0.2, 0.5], params, process_group=process_group)
            out[mode, normalize] = (alpha, [p.grad.clone() for p in params], present)
    return out


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y, c2g = _dist_batch()
    half = slice(rank * 16, (rank + 1) * 16)
    counts = torch.bincount(y[half], minlength=7)
    dist.all_reduce(counts)
    torch.save({"global": _dist_runs(x[half], y[half], c2g, counts, dist.group.WORLD),
                "local": _dist_runs(x[half], y[half], c2g, counts, None)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    """With the process group: every rank adds the one-process update of the whole batch (float64,
    1e-10). Without it (None): no hidden collective, each rank keeps its own half's gradient,
    even though torch.distributed is initialised."""
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y, c2g = _dist_batch()
    single = _dist_runs(x, y, c2g, None, None)
    ranked = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank in range(2):
        for key, (alpha, grads, present) in single.items():
            r_alpha, r_grads, r_present = ranked[rank]["global"][key]
            assert r_present.tolist() == present.tolist() == [True, True, True, False]
            assert torch.allclose(r_alpha, alpha, rtol=0, atol=1e-10), key
            for a, b in zip(r_grads, grads):
                assert torch.allclose(a, b, rtol=0, atol=1e-10), key
    # local: rank 0's gradient differs from the global one, and the two ranks' weighted-sum
    # gradients add up to it (the weights are fixed, so the update is linear in the samples)
    g0 = ranked[0]["local"]["weighted", "none"][1]
    g1 = ranked[1]["local"]["weighted", "none"][1]
    glob = single["weighted", "none"][1]
    assert not torch.allclose(g0[0], glob[0])
    for a, b, c in zip(g0, g1, glob):
        assert torch.allclose(a + b, c, rtol=0, atol=1e-10)


def test_group_losses_refuses_group_ids_beyond_num_groups():
    logits, y = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match=r"group ids must be in \[0, num_groups=2\)"):
        gbg.group_losses(logits, y, np.array([0, 1, 2, 1]), 2)
    losses, present = gbg.group_losses(logits, y, np.array([0, 1, 2, 1]), 3)
    assert present.all()


def test_workspace_keeps_its_largest_buffer():
    """A step with fewer present groups writes into the first rows of the kept [G, P] buffer; the
    next step with more groups reuses it (no new allocation)."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 5)
    workspace = {}
    for G in (3, 1, 3):
        losses = [((x[i] * w).sum() - i) ** 2 for i in range(G)]
        w.grad = None
        gbg.mgda_backward(losses, [w], workspace=workspace)
        if G == 3 and "first" not in workspace:
            workspace["first"] = workspace["flat"].data_ptr()
    assert workspace["flat"].shape[0] == 3 and workspace["flat"].data_ptr() == workspace["first"]


# ---------------------------------------------------------------- mgda_backward_features (MGDA-UB)

def _split_problem(seed=0):
    """The toy net as backbone (Linear, Tanh) -> z [B, 16] -> classifier (Linear), and its batch."""
    model = _mlp(seed)
    x, y, c2g = _problem()
    return model, model[:2], model[2], x, y, c2g


def _features_reference(model, body, head, x, y, c2g, with_head=True):
    """Gram of [dL_i/dz, dL_i/d(head)], each group's gradients by its own forward and autograd call."""
    rows = []
    for i in range(3):
        z = body(x)
        L = group_losses(head(z), y, c2g, 3)[0][i]
        inputs = [z] + (list(head.parameters()) if with_head else [])
        rows.append(_flat(torch.autograd.grad(L, inputs)))
    rows = torch.stack(rows)
    return rows @ rows.T


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_features_step_matches_separate_passes(normalize, update):
    """The Gram over [dL_i/dz, dL_i/d(classifier)] equals the one from per-group autograd calls;
    alpha is its min-norm point (normalised as documented) and p.grad = sum_i w_i g_i over every
    parameter, g_i from separate full backwards."""
    model, body, head, x, y, c2g = _split_problem()
    M = _features_reference(model, body, head, x, y, c2g)
    ref, ref_losses = _reference_grads(model, x, y, c2g)
    n = _norms(normalize, M.diagonal().sqrt().reshape(3, 1), ref_losses)  # l2: the norms over [z, classifier]
    alpha = min_norm_weights(M / torch.outer(n, n))
    w = _weights_ref(alpha, n, update)
    want = w @ torch.stack([_flat(g) for g in ref])
    model.zero_grad(set_to_none=True)
    z = body(x)
    losses, present = group_losses(head(z), y, c2g, 3)
    out = gbg.mgda_backward_features(losses[present], z, model.parameters(), gram_params=head.parameters(),
                                     normalize=normalize, update=update)
    assert torch.allclose(out["gram"], M / torch.outer(n, n), rtol=1e-10, atol=0)
    assert torch.allclose(out["alpha"], alpha, atol=1e-10)
    assert torch.allclose(_flat(p.grad for p in model.parameters()), want, rtol=0, atol=1e-12)
    assert not torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)  # not a trivial solve


def test_features_gram_of_z_alone_is_diagonal_for_disjoint_groups():
    """GBG's groups own disjoint rows of z, so the z-Gram is diagonal (under l2 every alpha is
    1/G, whatever the gradients): the classifier's gradients are what couple the groups."""
    model, body, head, x, y, c2g = _split_problem(1)
    z = body(x)
    losses, present = group_losses(head(z), y, c2g, 3)
    z_only = gbg.mgda_backward_features(losses, z, model.parameters(), normalize="none", retain_graph=True)["gram"]
    M = _features_reference(model, body, head, x, y, c2g, with_head=False)
    assert torch.allclose(z_only, M, rtol=1e-10, atol=0)
    assert torch.count_nonzero(z_only - torch.diag(z_only.diagonal())) == 0
    l2 = gbg.mgda_backward_features(losses, z, model.parameters(), normalize="l2", retain_graph=True)
    assert torch.allclose(l2["alpha"], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)
    both = gbg.mgda_backward_features(losses, z, model.parameters(), gram_params=head.parameters(),
                                      normalize="none")["gram"]
    off = both - torch.diag(both.diagonal())
    assert off.abs().max() > 1e-3 * both.diagonal().max()
    for bad in (None, z.detach()):  # train.py's take_step without z, or a z cut from the graph
        with pytest.raises(ValueError, match="features must be"):
            gbg.mgda_backward_features(group_losses(head(body(x)), y, c2g, 3)[0], bad, model.parameters())
    other = body(x)  # the same values, another node of the graph: the losses do not read it
    with pytest.raises(ValueError, match="does not read `features`"):
        gbg.mgda_backward_features(group_losses(head(body(x)), y, c2g, 3)[0], other, model.parameters(),
                                   gram_params=head.parameters())


def test_features_step_with_z_the_parameter_is_the_exact_step():
    """z = theta [B, d], a parameter read by the classifier: the features step over [theta,
    classifier] is mgda_backward over the same parameters (alpha, weights, p.grad)."""
    x, y, c2g = _problem(seed=7)
    for normalize in NORMALIZE:
        torch.manual_seed(3)
        theta = nn.Parameter(torch.randn(len(y), 8, dtype=torch.float64))
        head = nn.Linear(8, 6).double()
        params = [theta] + list(head.parameters())
        losses, present = group_losses(head(theta), y, c2g, 3)
        got = gbg.mgda_backward_features(losses[present], theta, params, gram_params=head.parameters(),
                                         normalize=normalize)
        got_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        losses, present = group_losses(head(theta), y, c2g, 3)
        want = mgda_backward(losses[present], params, normalize=normalize)
        for key in ("alpha", "weights", "gram"):
            assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-13), (normalize, key)
        for a, p in zip(got_grads, params):
            assert torch.allclose(a, p.grad, rtol=0, atol=1e-13), normalize


def _jacobian_norm(body, x):
    """||dz/dtheta_body||_2 (largest singular value), the Jacobian built row by row."""
    z = body(x).reshape(-1)
    params = list(body.parameters())
    J = torch.stack([_flat(torch.autograd.grad(z[k], params, retain_graph=True)) for k in range(len(z))])
    return torch.linalg.matrix_norm(J, ord=2)


@pytest.mark.parametrize("seed", range(6))
def test_features_bound_on_random_networks(seed):
    """The bound that holds for the Gram over [z, classifier] (gbg.py, MGDA-UB), on random small
    networks, raw gradients (normalize "none"): with s = ||dz/dtheta||,
        exact min-norm value <= |sum_i alpha_i^UB g_i(theta)|^2 (alpha^UB pushed through the network)
                             <= max(s^2, 1) x the features step's min-norm value;
    and Sener & Koltun's Theorem 1 over the backbone alone: exact over the backbone <= s^2 x z-only."""
    torch.manual_seed(100 + seed)
    width = [4, 8, 12][seed % 3]
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 6), nn.Tanh(),
                          nn.Linear(6, 6)).double()
    for p in model.parameters():  # from small weights to large (s^2 is 50-120 here: bias columns sum over B rows)
        p.data.mul_(0.3 + seed * 0.4)
    body, head = model[:4], model[4]
    x, y, c2g = _problem(seed=seed, B=48)
    s2 = _jacobian_norm(body, x) ** 2

    def solve(fn, **kw):
        model.zero_grad(set_to_none=True)
        z = body(x)
        losses, present = group_losses(head(z), y, c2g, 3)
        out = fn(losses[present], z, **kw)
        return float(out["alpha"] @ out["gram"] @ out["alpha"]), out["alpha"]

    exact = lambda L, z, gram_params=None: mgda_backward(L, model.parameters(), gram_params=gram_params,
                                                         normalize="none")
    v_exact, _ = solve(exact)
    v_ub, a_ub = solve(lambda L, z: gbg.mgda_backward_features(L, z, model.parameters(),
                                                               gram_params=head.parameters(), normalize="none"))
    model.zero_grad(set_to_none=True)
    ref, _ = _reference_grads(model, x, y, c2g)
    g = torch.stack([_flat(r) for r in ref])
    pushed = float((a_ub @ g).square().sum())
    assert v_exact <= pushed * (1 + 1e-10)
    assert pushed <= max(float(s2), 1.0) * v_ub * (1 + 1e-10)
    v_body, _ = solve(exact, gram_params=list(body.parameters()))
    v_z, _ = solve(lambda L, z: gbg.mgda_backward_features(L, z, model.parameters(), normalize="none"))
    assert v_body <= float(s2) * v_z * (1 + 1e-10)
