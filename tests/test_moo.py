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


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_mgda_backward_exact_matches_separate_backwards(normalize):
    model = _mlp(0)
    x, y, c2g = _problem()
    ref, ref_losses = _reference_grads(model, x, y, c2g)
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in ref])
    n = _norms(normalize, flat, ref_losses)
    alpha_ref = min_norm_weights((flat @ flat.T) / torch.outer(n, n))
    d_ref = [sum(alpha_ref[i] / n[i] * ref[i][k] for i in range(3)) for k in range(4)]

    params = list(model.parameters())
    before = torch.randn_like(params[0])
    params[0].grad = before.clone()  # accumulation: p.grad += d, like .backward()
    losses, present = group_losses(model(x), y, c2g, 3)
    alpha, gram = mgda_backward(losses[present], params, normalize=normalize, return_gram=True)
    assert torch.allclose(alpha, alpha_ref.to(alpha), atol=1e-9)
    assert torch.allclose(gram, (flat @ flat.T) / torch.outer(n, n))
    assert torch.allclose(params[0].grad, before + d_ref[0], atol=1e-10)
    for p, d in zip(params[1:], d_ref[1:]):
        assert torch.allclose(p.grad, d, atol=1e-10)
    diag = step_diagnostic(gram, alpha, losses)
    assert min(diag["cos"]) >= -1e-9 and diag["d_norm"] > 0
    d_flat = torch.cat([d.reshape(-1) for d in d_ref])
    assert math.isclose(diag["d_norm"], d_flat.norm().item(), rel_tol=1e-9)
    cos = F.cosine_similarity(flat, d_flat[None], dim=1)
    assert np.allclose(diag["cos"], cos.numpy(), atol=1e-9)


def test_mgda_backward_gram_subset_frozen_g1_and_retain_graph():
    model = _mlp(1)
    x, y, c2g = _problem(6)
    ref, _ = _reference_grads(model, x, y, c2g)
    last = [model[2].weight, model[2].bias]
    sub = torch.stack([torch.cat([g[2].reshape(-1), g[3].reshape(-1)]) for g in ref])
    alpha_ref = min_norm_weights(sub @ sub.T)
    model[0].bias.requires_grad_(False)  # frozen: skipped, no grad created
    losses, _ = group_losses(model(x), y, c2g, 3)
    alpha = mgda_backward(list(losses), model.parameters(), gram_params=last)
    assert torch.allclose(alpha, alpha_ref, atol=1e-9)
    assert model[0].bias.grad is None
    assert torch.allclose(model[0].weight.grad, sum(alpha_ref[i] * ref[i][0] for i in range(3)))
    with pytest.raises(ValueError, match="subset"):
        mgda_backward(list(group_losses(model(x), y, c2g, 3)[0]), last, gram_params=[model[0].weight])

    # G = 1: p.grad = g_1 / n_1; the graph is freed unless retain_graph
    for normalize in NORMALIZE:
        model.zero_grad(set_to_none=True)
        L = group_losses(model(x), y, c2g, 3)[0][1]
        alpha = mgda_backward([L], model.parameters(), normalize=normalize, retain_graph=True)
        assert alpha.tolist() == [1.0]
        flat = torch.cat([t.reshape(-1) for k, t in enumerate(ref[1]) if k != 1])[None]
        n = _norms(normalize, flat, L.detach()[None])[0]
        assert torch.allclose(model[2].weight.grad, ref[1][2] / n)
        L.backward()  # graph kept
    L = group_losses(model(x), y, c2g, 3)[0][0]
    mgda_backward([L], model.parameters())
    with pytest.raises(RuntimeError):
        L.backward()


def test_absent_group_makes_the_step_zero():
    """Why the caller must drop absent groups: a zero gradient is the min-norm point."""
    model = _mlp(2)
    x, y, c2g = _problem(7)
    losses, present = group_losses(model(x[:36]), y[:36], c2g, 3)
    assert present.tolist() == [True, False, False]
    with pytest.warns(UserWarning, match="zero gradient"):
        mgda_backward(list(losses), model.parameters())
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


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 6)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_features_mode(normalize):
    torch.manual_seed(9)
    net = _Net().double()
    x, y, c2g = _problem(10)
    # reference: Gram of dL_i/dz from an independent forward
    z = net.body(x)
    L = group_losses(net.head(z), y, c2g, 3)[0]
    Z = torch.stack([torch.autograd.grad(L[i], z, retain_graph=True)[0].reshape(-1) for i in range(3)])
    n = _norms(normalize, Z, L.detach())
    alpha_ref = min_norm_weights((Z @ Z.T) / torch.outer(n, n))
    ref = copy.deepcopy(net)
    (sum(alpha_ref[i] / n[i] * group_losses(ref.head(ref.body(x)), y, c2g, 3)[0][i]
         for i in range(3))).backward()

    z = net.body(x)
    losses, _ = group_losses(net.head(z), y, c2g, 3)
    alpha = mgda_backward(list(losses), net.parameters(), features=z, normalize=normalize)
    assert torch.allclose(alpha, alpha_ref, atol=1e-9)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10)


# ---------------------------------------------------------------- distributed (gloo, 2 processes)

def _dist_batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    # group 2 (classes 4, 5) lives only in the second half; class 6 / group 3 is absent
    y = torch.cat([torch.randint(0, 4, (16,), generator=g), torch.randint(0, 6, (16,), generator=g)])
    return x, y, torch.tensor([0, 0, 1, 1, 2, 2, 3])


def _dist_runs(x, y, c2g, class_counts):
    """Each (mode, normalize) step on a fresh copy of the same net; returns alpha and grads."""
    out = {}
    for features in (False, True):
        for normalize in ("none", "loss+"):
            torch.manual_seed(12)
            net = nn.ModuleDict({"body": nn.Sequential(nn.Linear(5, 8), nn.Tanh()),
                                 "head": nn.Linear(8, 7)}).double()
            z = net["body"](x)
            losses, present = group_losses(net["head"](z), y, c2g, 4, class_counts=class_counts)
            alpha = mgda_backward(losses[present], list(net.parameters()), normalize=normalize,
                                  features=z if features else None)
            out[features, normalize] = (alpha, [p.grad.clone() for p in net.parameters()], present)
    return out


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y, c2g = _dist_batch()
    half = slice(rank * 16, (rank + 1) * 16)
    counts = torch.bincount(y[half], minlength=7)
    dist.all_reduce(counts)
    torch.save(_dist_runs(x[half], y[half], c2g, counts), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y, c2g = _dist_batch()
    single = _dist_runs(x, y, c2g, None)
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for key, (alpha, grads, present) in single.items():
            r_alpha, r_grads, r_present = ranked[key]
            assert r_present.tolist() == present.tolist() == [True, True, True, False]
            assert torch.allclose(r_alpha, alpha, atol=1e-10), key
            for a, b in zip(r_grads, grads):
                assert torch.allclose(a, b, atol=1e-10), key
