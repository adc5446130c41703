"""The authors' release (WickyLee1998/GBG_v1 @681e276) beside gbg.py, measured. Not a test (pytest
does not collect study_*): it prints and writes JSON.

    python tests/study_release.py solver --out results/release_solver/solver.json \\
        [--release-file min_norm_solvers.py]   # from GBG_v1 @681e276, to cross-check
    python tests/study_release.py assign --out results/graph_self_loops/assign.json
    python tests/study_release.py groups --runs /tmp/acc/s0 /tmp/acc/s1 --data-root DIR \\
        --out results/graph_self_loops/groups.json

solver: the release's MinNormSolver.find_min_norm_element (min_norm_solvers.py l.9-149), re-written
    below line by line in float64 numpy, against gbg.min_norm_weights (exact to 1e-12 relative) on
    random gradients: how far above the min-norm objective |sum_i alpha_i g_i|^2 it stops, and
    after how many iterations. Its loop never increments iter_count (l.122-149), so MAX_ITER = 250
    is no bound: it runs until the L1 change of alpha is below STOP_CRIT = 1e-5 (a cap of
    --max-iter iterations here stands for "would not stop").
assign: how the two label assignments of gbg.ncut_groups (k-means on the unit-row embedding, and
    the release's cluster_qr) compare on synthetic affinities: the NCut value each reaches.
groups: the CIFAR-10 JPEG copy's groups at the end of the warm-up, from checkpoints written by
    `train.py ... --exit-after-epoch 4` (the model that train.py groups at epoch 5): the class
    gradients as make_groups takes them, then NCut on the graph with self-loops (W_ii = 2, gbg.py
    before 2d09522), without them (now), and cluster_qr (the release's assignment, no self-loops).
"""
import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gbg  # noqa: E402


# --- the release's solver, line by line ------------------------------------------------------------

def _from2(v1v1, v1v2, v2v2):
    """MinNormSolver._min_norm_element_from2 (l.9-30): min over c of |c x1 + (1 - c) x2|^2, with
    c clamped to 0.999 / 0.001 (not 1 / 0) at the ends."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _projection2simplex(y):
    """l.60-74."""
    m = len(y)
    sorted_y = np.flip(np.sort(y), axis=0)
    tmpsum = 0.0
    tmax_f = (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, np.zeros(y.shape))


def _next_point(cur_val, grad, n):
    """l.76-100."""
    proj_grad = grad - (np.sum(grad) / n)
    tm1 = -1.0 * cur_val[proj_grad < 0] / proj_grad[proj_grad < 0]
    tm2 = (1.0 - cur_val[proj_grad > 0]) / (proj_grad[proj_grad > 0])
    t = 1
    if len(tm1[tm1 > 1e-7]) > 0:
        t = np.min(tm1[tm1 > 1e-7])
    if len(tm2[tm2 > 1e-7]) > 0:
        t = min(t, np.min(tm2[tm2 > 1e-7]))
    return _projection2simplex(proj_grad * t + cur_val)


def release_min_norm(dps, max_iter=1_000_000):
    """MinNormSolver.find_min_norm_element (l.102-149) on the Gram dps [n, n]: the best pair
    (_min_norm_2d, l.32-58), then projected gradient steps with the clamped line search until the
    L1 change is below 1e-5; returns (alpha, iterations). It returns the point BEFORE the last
    update (l.147-148). The release sums the Gram's products in float32 (pass that Gram) and
    mixes float32 torch scalars into a few line searches; here the loop runs in float64."""
    n = len(dps)
    dmin, sol = 1e8, None
    for i in range(n):
        for j in range(i + 1, n):
            c, d = _from2(dps[i, i], dps[i, j], dps[j, j])
            if d < dmin:
                dmin, sol = d, [(i, j), c, d]
    sol_vec = np.zeros(n)
    sol_vec[sol[0][0]] = sol[1]
    sol_vec[sol[0][1]] = 1 - sol[1]
    if n < 3:
        return sol_vec, 0
    it = 0
    while it < max_iter:  # the release: `while iter_count < MAX_ITER` with iter_count never incremented
        it += 1
        grad_dir = -1.0 * np.dot(dps, sol_vec)
        new_point = _next_point(sol_vec, grad_dir, n)
        v1v1 = sol_vec @ dps @ sol_vec
        v1v2 = sol_vec @ dps @ new_point
        v2v2 = new_point @ dps @ new_point
        nc, nd = _from2(v1v1, v1v2, v2v2)
        new_sol_vec = nc * sol_vec + (1 - nc) * new_point
        if np.sum(np.abs(new_sol_vec - sol_vec)) < 1e-5:
            return sol_vec, it
        sol_vec = new_sol_vec
    return sol_vec, None  # would not have stopped


def _load_release(path):
    """The release's own min_norm_solvers.py (`git show 681e276:min_norm_solvers.py`), to run its
    MinNormSolver beside the re-implementation."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("release_min_norm_solvers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MinNormSolver


def solver_study(study):
    """Random gradients [G, dim]: i.i.d. Gaussian rows ("iid"), and rows sharing a common component
    ("shared": g_i = c + 0.5 z_i, all pairwise cosines positive, as class-group gradients often
    are); each row scaled by a log-uniform factor in [0.1, 10] ("scaled") or not. The objective
    is f(alpha) = alpha^T M alpha on the float64 Gram M; excess = f(release) / f(exact) - 1.
    The release's solver sees the Gram of the float32 gradients, as it computes it (l.43-53).
    With --release-file, the release's own solver also runs on the float32 gradients (as torch
    tensors) of every draw that the re-implementation solves within --cross-max-iter iterations
    (its Python loops are slow), and the largest |alpha difference| is reported."""
    rng = np.random.default_rng(study.seed)
    theirs_solver = _load_release(study.release_file) if study.release_file else None
    cross = []
    cases = []
    for kind in ("iid", "shared"):
        for scaled in (False, True):
            for dim in (10, 100, 1000):
                excess, norm_excess, iters, stuck = [], [], [], 0
                for _ in range(study.draws):
                    g = rng.normal(size=(study.G, dim))
                    if kind == "shared":
                        g = rng.normal(size=(1, dim)) + 0.5 * g
                    if scaled:
                        g = g * np.exp(rng.uniform(np.log(0.1), np.log(10), size=(study.G, 1)))
                    M = g @ g.T
                    g32 = g.astype(np.float32)
                    a_rel, it = release_min_norm((g32 @ g32.T).astype(np.float64), study.max_iter)
                    a_opt = gbg.min_norm_weights(torch.from_numpy(M)).numpy()
                    f_rel, f_opt = a_rel @ M @ a_rel, a_opt @ M @ a_opt
                    excess.append(f_rel / f_opt - 1)
                    norm_excess.append(np.sqrt(f_rel / f_opt) - 1)
                    if it is None:
                        stuck += 1
                    else:
                        iters.append(it)
                    if theirs_solver is not None and it is not None and it <= study.cross_max_iter:
                        theirs, _ = theirs_solver.find_min_norm_element([[torch.from_numpy(r)] for r in g32])
                        theirs = np.asarray(theirs, dtype=np.float64)
                        cross.append((np.abs(theirs - a_rel).max(), theirs @ M @ theirs / f_opt - 1, excess[-1]))
                e, ne = np.array(excess), np.array(norm_excess)
                case = {"kind": kind, "scaled_rows": scaled, "dim": dim, "G": study.G, "draws": study.draws,
                        "excess_sq_norm": {"max": e.max(), "p99": np.quantile(e, 0.99), "p90": np.quantile(e, 0.9),
                                           "median": np.median(e), "share_above_1pct": float((e > 0.01).mean())},
                        "excess_norm": {"max": ne.max(), "median": np.median(ne)},
                        "iterations": {"max": max(iters) if iters else None,
                                       "median": float(np.median(iters)) if iters else None},
                        "not_stopped_within_max_iter": stuck}
                cases.append(case)
                print(f"{kind:6} scaled={scaled!s:5} dim={dim:4}: |d|^2 above the optimum by max "
                      f"{100 * e.max():.1f} %, p99 {100 * np.quantile(e, 0.99):.1f} %, p90 "
                      f"{100 * np.quantile(e, 0.9):.2f} %, median {100 * np.median(e):.3f} % (|d|: max "
                      f"{100 * ne.max():.1f} %); > 1 %: {100 * (e > 0.01).mean():.1f} % of draws; iterations median "
                      f"{case['iterations']['median']}, max {case['iterations']['max']}; not stopped: {stuck}",
                      flush=True)
    worst = max(cases, key=lambda c: c["excess_sq_norm"]["max"])
    out = {"cases": cases, "worst_excess_sq_norm": worst["excess_sq_norm"]["max"],
           "worst_case": {k: worst[k] for k in ("kind", "scaled_rows", "dim")}}
    if cross:
        c = np.array(cross)
        out["cross_check_with_release_file"] = {"draws": len(cross), "alpha_max_abs_diff": c[:, 0].max(),
                                                "excess_max_abs_diff": np.abs(c[:, 1] - c[:, 2]).max()}
        print(f"the release's own solver on {len(cross)} draws: alpha within {c[:, 0].max():.2e}, excess within "
              f"{np.abs(c[:, 1] - c[:, 2]).max():.2e} of the re-implementation's", flush=True)
    return out


# --- k-means against cluster_qr -------------------------------------------------------------------

def planted(sizes, noise, dim, rng):
    truth = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.normal(size=(len(sizes), dim))
    return gbg.affinity(torch.from_numpy(centres[truth] + noise * rng.normal(size=(truth.size, dim)))), truth


def assign_study(study):
    """Eq. 9 (gbg.ncut_value, the graph without self-loops) of the k-means and cluster_qr groups,
    per setting over study.draws affinities: planted blocks of random sizes with weak structure
    (noise 1, 2 and 3 times the centres' scale, 200 dimensions) and i.i.d. Gaussian gradients."""
    rng = np.random.default_rng(study.seed)
    out = []
    for K, G in ((10, 4), (100, 4), (100, 8)):
        for noise in (1.0, 2.0, 3.0, None):
            kmeans_lower = qr_lower = ties = 0
            rel, ari, kmeans_seed_ari = [], [], []
            for _ in range(study.draws):
                if noise is None:
                    A = gbg.affinity(torch.from_numpy(rng.normal(size=(K, 3 * K))))
                else:
                    sizes = rng.multinomial(K - G, np.ones(G) / G) + 1
                    A, _ = planted(list(sizes), noise, 200, rng)
                km = gbg.ncut_groups(A, G, seed=0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qr = gbg.ncut_groups(A, G, assign="cluster_qr")
                v_km, v_qr = gbg.ncut_value(A, km), gbg.ncut_value(A, qr)
                if abs(v_km - v_qr) <= 1e-9 * max(v_km, v_qr):
                    ties += 1
                elif v_km < v_qr:
                    kmeans_lower += 1
                else:
                    qr_lower += 1
                rel.append(v_qr / v_km - 1)
                ari.append(gbg.adjusted_rand_index(km, qr))
                kmeans_seed_ari.append(gbg.adjusted_rand_index(km, gbg.ncut_groups(A, G, seed=1)))
            row = {"K": K, "G": G, "structure": "iid" if noise is None else f"planted, noise {noise:g}",
                   "draws": study.draws, "kmeans_lower": kmeans_lower, "cluster_qr_lower": qr_lower, "equal": ties,
                   "eq9_cluster_qr_over_kmeans_minus_1": {"mean": float(np.mean(rel)), "min": float(np.min(rel)),
                                                         "max": float(np.max(rel))},
                   "ari_kmeans_vs_cluster_qr_mean": float(np.mean(ari)),
                   "ari_kmeans_seed0_vs_seed1_mean": float(np.mean(kmeans_seed_ari))}
            out.append(row)
            print(f"K={K:3} G={G} {row['structure']:18}: Eq. 9 lower with k-means {kmeans_lower}, with cluster_qr "
                  f"{qr_lower}, equal {ties} of {study.draws}; cluster_qr / k-means - 1: mean {np.mean(rel):+.4f} "
                  f"(min {np.min(rel):+.4f}, max {np.max(rel):+.4f}); ARI k-means vs cluster_qr {np.mean(ari):.3f}, "
                  f"k-means seed 0 vs 1 {np.mean(kmeans_seed_ari):.3f}", flush=True)
    return {"settings": out,
            "totals": {k: int(sum(r[k] for r in out)) for k in ("kmeans_lower", "cluster_qr_lower", "equal")}}


# --- the CIFAR-10 JPEG copy's groups at the end of the warm-up --------------------------------------

def _graph_with_self_loops(A):
    """gbg._graph_weights before 2d09522: W = affinity + 1 everywhere, W_ii = 2."""
    A = torch.as_tensor(A).double().cpu().numpy()
    return np.clip((A + A.T) / 2 + 1.0, 0.0, None)


def ncut_exhaustive(A, G):
    """The partition of the K classes into G non-empty groups with the lowest NCut value on the
    graph without self-loops, by enumerating every partition (restricted growth strings: S(10, 4)
    = 34,105 at K = 10). Returns (labels, value)."""
    W = gbg._graph_weights(A)
    K = len(W)
    parts = []

    def grow(prefix, used):
        if len(prefix) == K:
            if used == G:
                parts.append(prefix)
            return
        if G - used > K - len(prefix):
            return
        for g in range(min(used + 1, G)):
            grow(prefix + [g], max(used, g + 1))
    grow([0], 1)
    labels = np.array(parts)
    H = np.eye(G)[labels]  # [n, K, G]
    assoc = np.einsum("nig,ij->ng", H, W)
    within = np.einsum("nig,ij,njg->ng", H, W, H)
    values = ((assoc - within) / assoc).sum(1)
    best = int(np.argmin(values))
    return labels[best], float(values[best])


def groups_study(study):
    import data_lt
    import train
    data = data_lt.build_data("folder-lt", study.data_root, imb_factor=100, seed=0)
    train_dir = os.path.join(study.data_root, "train")  # folder-lt: class k is the k-th folder by name
    names = sorted(c for c in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, c)))
    runs = []
    for run in study.runs:
        ckpt = torch.load(Path(run) / "checkpoint.pth", map_location="cpu", weights_only=False)
        args = argparse.Namespace(**ckpt["args"])
        args.rank, args.world_size, args.distributed = 0, 1, False
        torch.manual_seed(args.seed)
        model = train.build_model(args.arch, data.num_classes)
        model.load_state_dict(ckpt["model"])
        if args.amp:
            model = model.to(memory_format=torch.channels_last)
        t0 = time.time()
        # what make_groups does at --group-epoch 5 (args from the checkpoint: seed, recalibrate_bn)
        present = np.flatnonzero(data.class_counts > 0)
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        grads = gbg.class_gradients(model, data.train_eval, data.num_classes, backbone, device="cpu", seed=args.seed,
                                    recalibrate_bn=args.recalibrate_bn, worker_init_fn=data_lt.worker_init)
        A = gbg.affinity(grads[present])
        G = args.num_groups
        new = gbg.ncut_groups(A, G, seed=args.seed)
        qr = gbg.ncut_groups(A, G, assign="cluster_qr")
        real = gbg._graph_weights
        try:
            gbg._graph_weights = _graph_with_self_loops
            old = gbg.ncut_groups(A, G, seed=args.seed)
            old_eq9_own_graph = gbg.ncut_value(A, old)
        finally:
            gbg._graph_weights = real
        parts = {"with_self_loops": old, "without_self_loops": new, "cluster_qr": qr}
        if len(present) <= 12:
            parts["eq9_minimum"] = ncut_exhaustive(A, G)[0]
        entry = {"run": str(run), "seed": args.seed, "epoch_of_checkpoint": ckpt["epoch"],
                 "seconds": time.time() - t0, "G": G,
                 "partitions": {k: [[names[present[i]] for i in np.flatnonzero(v == g)] for g in range(v.max() + 1)]
                                for k, v in parts.items()},
                 "eq9_without_self_loops": {k: gbg.ncut_value(A, v) for k, v in parts.items()},
                 "eq9_with_self_loops_of_old": old_eq9_own_graph,
                 "ari": {"old_vs_new": gbg.adjusted_rand_index(old, new),
                         "new_vs_cluster_qr": gbg.adjusted_rand_index(new, qr),
                         "old_vs_cluster_qr": gbg.adjusted_rand_index(old, qr),
                         **({f"{k}_vs_eq9_minimum": gbg.adjusted_rand_index(v, parts["eq9_minimum"])
                             for k, v in parts.items() if k != "eq9_minimum"} if "eq9_minimum" in parts else {})},
                 "affinity": A.tolist()}
        runs.append(entry)
        print(f"{run} (seed {args.seed}, after epoch {ckpt['epoch']}):", flush=True)
        for k, v in entry["partitions"].items():
            print(f"  {k:19} Eq. 9 {entry['eq9_without_self_loops'][k]:.4f}  {v}")
        print(f"  ARI {entry['ari']}")
    if len(runs) == 2:
        a, b = runs
        across = {}
        for k in a["partitions"]:
            la = np.zeros(len(names), int)
            lb = np.zeros(len(names), int)
            for g, members in enumerate(a["partitions"][k]):
                la[[names.index(m) for m in members]] = g
            for g, members in enumerate(b["partitions"][k]):
                lb[[names.index(m) for m in members]] = g
            across[k] = gbg.adjusted_rand_index(la, lb)
        print(f"ARI seed {a['seed']} vs seed {b['seed']}: {across}")
        return {"runs": runs, "ari_across_seeds": across, "classes": names}
    return {"runs": runs, "classes": names}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["solver", "assign", "groups"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=None, help="solver: 200 per setting; assign: 40")
    p.add_argument("--G", type=int, default=6, help="solver: number of gradients")
    p.add_argument("--max-iter", type=int, default=1_000_000, help="solver: count a run as not stopping after this")
    p.add_argument("--release-file", default=None, help="solver: the release's min_norm_solvers.py, to cross-check")
    p.add_argument("--cross-max-iter", type=int, default=300, help="solver: cross-check draws up to this many iterations")
    p.add_argument("--runs", nargs="+", default=[], help="groups: output dirs holding checkpoint.pth")
    p.add_argument("--data-root", default=None, help="groups: the CIFAR-10 image folders (train/, test/)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    study = p.parse_args()
    torch.set_num_threads(study.threads)
    t0 = time.time()
    if study.part == "solver":
        study.draws = study.draws or 200
        res = solver_study(study)
    elif study.part == "assign":
        study.draws = study.draws or 40
        res = assign_study(study)
    else:
        res = groups_study(study)
    res["setup"] = {"argv": sys.argv[1:], "seconds": time.time() - t0, "torch": torch.__version__,
                    "numpy": np.__version__}
    if study.out:
        os.makedirs(os.path.dirname(os.path.abspath(study.out)), exist_ok=True)
        with open(study.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
