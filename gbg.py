"""
GBG: Gradient-Balancing Grouping (Li et al., "Long-Tailed Learning as Multi-Objective
Optimization", AAAI 2024).

Stage 1 groups the K classes: each class's mean loss gradient w.r.t. the backbone, their cosine
affinity (Eq. 7), and a spectral normalised cut of that affinity graph into G groups (Eq. 8-9).
Stage 2 trains with one objective per group: the GAC sampler puts every group into every
mini-batch, and an MGDA min-norm step combines the G group gradients (Eq. 10-12).

This module needs only torch, numpy and scipy.
"""

import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2


# --- 1. Class gradients and their affinity (Eq. 7) -----------------------------------------

def _dataset_labels(dataset):
    """Labels of a map-style dataset: `dataset.targets` if it has one, else one pass over it."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    elif torch.is_tensor(targets):
        targets = targets.cpu().numpy()
    return np.asarray(targets, dtype=np.int64).reshape(-1)


def _backbone_params(model):
    """Every trainable parameter except the last nn.Linear's: the classifier is left out, as the
    authors measure the gradients of the shared feature extractor."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = {id(p) for p in linears[-1].parameters()} if linears else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in classifier]


def _same_device(a, b):
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _count_sketch_hashes(num_params, sketch_dim, seed):
    """CountSketch bucket h: [P] -> [m] and sign s: [P] -> +-1. Drawn on the CPU from a seeded
    generator, so every process (whatever its device) sketches with the same map."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, sketch_dim, (num_params,), generator=gen)
    s = torch.randint(0, 2, (num_params,), generator=gen, dtype=torch.int8) * 2 - 1
    return h, s


def class_gradients(model, dataset, num_classes, *, params=None, batch_size=256, max_per_class=None,
                    sketch_dim=None, device=None, seed=0, classes=None, num_workers=0, worker_init_fn=None):
    """Mean per-sample cross-entropy gradient of each class, as a float32 CPU tensor [K, D].

    The model runs in eval mode (BatchNorm uses its running statistics, so a sample's gradient
    does not depend on its batch mates); each module's previous mode is restored afterwards.
    `params` defaults to the backbone: every trainable parameter except the last nn.Linear's.
    D is their total numel, or `sketch_dim` when given.

    Cost is about one forward+backward over the samples: every batch holds ONE class, so the
    gradient of the summed loss is that class's gradient sum; the sums are divided by the counts.

    `max_per_class` caps each class at a seeded random subset. `classes` restricts the work to
    those rows (the others stay zero), so processes can share the classes and sum the rows; the
    subsets and the sketch depend only on `seed`, never on which process computes a row.

    Sketch mode (`sketch_dim=m`): every batch's flattened gradient g is compressed to
    (S g)_b = sum_{i: h(i)=b} s_i g_i with a seeded CountSketch (h, s); S is linear, so the sum of
    the sketches is the sketch of the sum and the K x P matrix is never built (memory O(K*m + P)).
    For unit vectors a, b, <Sa, Sb> is unbiased for <a, b> with
        Var = (1 + <a,b>^2 - 2 sum_i a_i^2 b_i^2) / m <= 2/m,
    and the sketched norms obey the same bound, so each cosine of the sketches is off by
    O(sqrt(2/m)). tests/test_grouping.py checks, for fixed seeds, m = 2048 and 8192, that the
    largest error over all class pairs is <= 3 * sqrt(2/m) and the mean error <= sqrt(2/m).
    """
    model_device = next(model.parameters()).device
    device = model_device if device is None else torch.device(device)
    if not _same_device(device, model_device):
        raise ValueError(f"class_gradients: the model is on {model_device} but device={device}; "
                         f"move the model there first or leave device=None")
    params = _backbone_params(model) if params is None else list(params)
    if not params:
        raise ValueError("class_gradients: no parameters to differentiate; pass params= or make "
                         "some of the model's parameters require grad")
    num_params = sum(p.numel() for p in params)
    if sketch_dim is not None and sketch_dim < 1:
        raise ValueError(f"class_gradients: sketch_dim={sketch_dim} must be >= 1, or None for "
                         f"exact rows")

    labels = _dataset_labels(dataset)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_gradients: labels must lie in [0, {num_classes}), found "
                         f"[{labels.min()}, {labels.max()}]; pass the right num_classes")
    wanted = range(num_classes) if classes is None else sorted({int(k) for k in classes})
    if any(not 0 <= k < num_classes for k in wanted):
        raise ValueError(f"class_gradients: classes must be ids in [0, {num_classes})")

    # Indices of each class (one stable sort instead of K scans), capped by a per-class seeded
    # draw so that a row is the same whichever process computes it.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))])
    members, empty = {}, []
    for k in wanted:
        idx = order[starts[k]:starts[k + 1]]
        if idx.size == 0:
            empty.append(k)
            continue
        if max_per_class is not None and idx.size > max_per_class:
            idx = np.sort(np.random.default_rng([seed, k]).choice(idx, max_per_class, replace=False))
        members[k] = idx
    if empty:
        shown = empty[:20] + (["..."] if len(empty) > 20 else [])
        warnings.warn(f"class_gradients: {len(empty)} class(es) have no samples and get a zero "
                      f"row: {shown}", stacklevel=2)

    batches, batch_class = [], []
    for k, idx in members.items():
        for i in range(0, idx.size, batch_size):
            batches.append(idx[i:i + batch_size].tolist())
            batch_class.append(k)

    dim = num_params if sketch_dim is None else int(sketch_dim)
    out = torch.zeros(num_classes, dim, dtype=torch.float32)
    if sketch_dim is not None:
        h, s = _count_sketch_hashes(num_params, dim, seed)
        h, s = h.to(device), s.to(device)
    dtype = params[0].dtype  # lets a float64 model take float32 images

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                             worker_init_fn=worker_init_fn)
        running, current = None, None
        for k, batch in zip(batch_class, loader):
            if k != current:  # batches of a class are consecutive: flush the finished class
                if current is not None:
                    out[current] = (running / members[current].size).float().cpu()
                running, current = torch.zeros(dim, dtype=torch.float64, device=device), k
            x, y = batch[0], torch.as_tensor(batch[1])
            if not bool((y == k).all()):
                raise ValueError(f"class_gradients: dataset[i][1] disagrees with dataset.targets "
                                 f"for class {k}; make the two label sources agree")
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), y.to(device), reduction="sum")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for g, p in zip(grads, params)]).double()
            if sketch_dim is None:
                running += flat
            else:
                running.index_add_(0, h, flat * s)
        if current is not None:
            out[current] = (running / members[current].size).float().cpu()
    finally:
        for m, mode in modes:
            m.training = mode
    return out


def affinity(class_grads):
    """Cosine similarity of the class gradients (Eq. 7), float64 [K, K]. A zero row (a class
    without samples) has affinity 0 to the others and 1 to itself."""
    g = torch.as_tensor(class_grads).double()
    norm = g.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, g / norm.clamp_min(1e-300), torch.zeros_like(g))
    A = (unit @ unit.T).clamp(-1.0, 1.0)
    A.fill_diagonal_(1.0)
    return A


# --- 2. Normalised-cut grouping of the affinity graph (Eq. 8-9) ----------------------------

def _check_num_groups(num_groups, num_classes):
    if not 1 <= num_groups <= num_classes:
        raise ValueError(f"num_groups={num_groups} must be between 1 and the number of classes "
                         f"K={num_classes}")


def _canonical(groups):
    """Relabel groups by their smallest class id, so equal partitions give equal arrays."""
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first)).astype(np.int64)[inverse.reshape(-1)]


def _graph_weights(A):
    # cosines lie in [-1, 1]; the +1 shift (as the authors do) makes the weights non-negative
    A = torch.as_tensor(A).double().cpu().numpy()
    if A.ndim != 2 or A.shape[0] != A.shape[1] or not np.isfinite(A).all():
        raise ValueError(f"affinity must be a finite square matrix, got shape {A.shape}")
    return np.clip((A + A.T) / 2 + 1.0, 0.0, None)


def _fill_empty_groups(X, labels, num_groups):
    """k-means can leave a cluster empty (e.g. duplicate classes): move the point farthest from
    its centroid, among groups that can spare one, into each empty group. Deterministic."""
    labels = labels.copy()
    for g in range(num_groups):
        if (labels == g).any():
            continue
        sizes = np.bincount(labels, minlength=num_groups)
        centroids = np.stack([X[labels == c].mean(0) if sizes[c] else X[0] for c in range(num_groups)])
        dist = ((X - centroids[labels]) ** 2).sum(1)
        dist[sizes[labels] < 2] = -1.0
        labels[int(np.argmax(dist))] = g
    return labels


def ncut_groups(affinity, num_groups, *, seed=0, n_init=10):
    """Partition the K classes into G groups by spectral normalised cut (Shi & Malik; the
    embedding of Ng, Jordan & Weiss). Returns int64 group ids [K], every group non-empty, labelled
    in order of their smallest class id, deterministic for a seed."""
    W = _graph_weights(affinity)
    K = W.shape[0]
    _check_num_groups(num_groups, K)
    if num_groups == 1:
        return np.zeros(K, dtype=np.int64)
    if num_groups == K:
        return np.arange(K, dtype=np.int64)

    # The G leading eigenvectors of D^-1/2 W D^-1/2 (the smallest of the normalised Laplacian)
    # relax the NCut indicator vectors; unit rows make the k-means step scale free.
    d = np.maximum(W.sum(1), 1e-12)
    M = W / np.sqrt(np.outer(d, d))
    _, U = scipy.linalg.eigh(M, subset_by_index=[K - num_groups, K - 1])
    U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)

    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(max(n_init, 1)):
        with warnings.catch_warnings():  # empty clusters are repaired below
            warnings.simplefilter("ignore")
            # `seed=` (not `rng=`, scipy >= 1.15) so that scipy >= 1.10 takes the Generator
            _, labels = kmeans2(U, num_groups, minit="++", seed=rng)
        labels = _fill_empty_groups(U, labels, num_groups)
        cost = sum(((U[labels == g] - U[labels == g].mean(0)) ** 2).sum() for g in range(num_groups))
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return _canonical(best)


def random_groups(num_classes, num_groups, *, seed=0):
    """Seeded random partition into G non-empty groups of near-equal size (Table 5 baseline)."""
    _check_num_groups(num_groups, num_classes)
    perm = np.random.default_rng(seed).permutation(num_classes)
    groups = np.empty(num_classes, dtype=np.int64)
    groups[perm] = np.arange(num_classes) % num_groups
    return _canonical(groups)


def count_groups(class_counts, num_groups):
    """Instance-number grouping (Li et al. 2020; Table 5 baseline): classes sorted by training
    count, most frequent first (stable), cut into G contiguous near-equal groups; group 0 = head."""
    counts = np.asarray(class_counts).reshape(-1)
    _check_num_groups(num_groups, counts.size)
    groups = np.empty(counts.size, dtype=np.int64)
    for g, chunk in enumerate(np.array_split(np.argsort(-counts, kind="stable"), num_groups)):
        groups[chunk] = g
    return groups


def ncut_value(affinity, groups):
    """Normalised-cut objective of Eq. 9 on W = affinity + 1: sum over groups V of
    cut(V, rest) / assoc(V, all). Lower is better; 0 means no weight between groups."""
    W = _graph_weights(affinity)
    groups = np.asarray(groups).reshape(-1)
    total = 0.0
    for g in np.unique(groups):
        inside = groups == g
        assoc = W[inside].sum()
        total += W[inside][:, ~inside].sum() / assoc if assoc > 0 else 0.0
    return float(total)


# --- 3. Group-Aware Completion (GAC) sampler -----------------------------------------------

def gac_class_probs(class_counts, groups, rho=0.9999, lam=1e-5):
    """P_j: the probability that a completion of group i draws class j (sums to 1 per group).

    p_j = (1 - beta_i) / (1 - beta_i ** N_j) is the class-balanced weight of Cui et al. (2019),
    normalised within the group. The paper's formula for beta_i is garbled; OUR READING:
        beta_i = rho + lam * delta_i,  delta_i = log(N_max,i / N_min,i) / log(N_max / N_min),
    the group's log imbalance relative to the whole training set's (0 on a balanced set), so a
    more imbalanced group gets beta closer to 1 and weights closer to inverse frequency.
    Classes without samples get probability 0.
    """
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    groups = np.asarray(groups, dtype=np.int64).reshape(-1)
    if counts.shape != groups.shape:
        raise ValueError(f"class_counts ({counts.size}) and groups ({groups.size}) must both have "
                         f"one entry per class")
    present = counts > 0
    if not present.any():
        raise ValueError("gac_class_probs: every class count is 0; pass the training counts")
    log_span = math.log(counts[present].max() / counts[present].min())
    probs = np.zeros(counts.size)
    for g in range(int(groups.max()) + 1):
        mine = (groups == g) & present
        if not mine.any():
            raise ValueError(f"group {g} has no training samples; regroup (e.g. over the classes "
                             f"present) or lower num_groups")
        n = counts[mine]
        delta = math.log(n.max() / n.min()) / log_span if log_span > 0 else 0.0
        beta = rho + lam * delta
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"gac_class_probs: beta={beta} for group {g} must be in [0, 1); "
                             f"lower rho or lam")
        # 1 - beta**N as -expm1(N log beta): exact even when beta**N is close to 1
        p = (1.0 - beta) / -np.expm1(n * math.log(beta)) if beta > 0 else np.ones_like(n)
        probs[mine] = p / p.sum()
    return probs


class GACBatchSampler:
    """Batch sampler (iterable of index lists) that makes every mini-batch hold every group.

    Each epoch shuffles all N indices with a generator seeded by (seed, epoch); with R replicas,
    rank r takes perm[r::R] of the permutation wrapped to a multiple of R (like
    DistributedSampler), so the ranks' t-th batches together form the one-process t-th batch of
    size R * batch_size. Cut into batches of `batch_size` (the per-rank size); every group a batch
    misses is topped up with ceil(fill * batch_size) of its samples: a class j ~ P_j
    (gac_class_probs), then a uniform sample of j, drawn with a generator seeded by
    (seed, epoch, rank). Call set_epoch(epoch) before iterating, as with DistributedSampler.
    """

    def __init__(self, labels, groups, batch_size, *, rho=0.9999, lam=1e-5, fill=0.1, seed=0,
                 num_replicas=1, rank=0, drop_last=False):
        labels = torch.as_tensor(labels).cpu().numpy().astype(np.int64).reshape(-1)
        groups = torch.as_tensor(groups).cpu().numpy().astype(np.int64).reshape(-1)
        K = groups.size
        if labels.size == 0:
            raise ValueError("GACBatchSampler: labels is empty; pass the training labels")
        if labels.min() < 0 or labels.max() >= K:
            raise ValueError(f"GACBatchSampler: labels must be class ids in [0, {K}) to index groups "
                             f"of length {K}, found [{labels.min()}, {labels.max()}]; pass a group "
                             f"for every class")
        if groups.min() < 0:
            raise ValueError("GACBatchSampler: group ids must be >= 0")
        if batch_size < 1 or not 0 < fill <= 1:
            raise ValueError(f"GACBatchSampler: need batch_size >= 1 and 0 < fill <= 1, got "
                             f"batch_size={batch_size}, fill={fill}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"GACBatchSampler: rank={rank} must be in [0, num_replicas={num_replicas})")
        counts = np.bincount(labels, minlength=K)
        self.num_groups = int(groups.max()) + 1
        for g in range(self.num_groups):  # before gac_class_probs, to name the real problem
            if counts[groups == g].sum() == 0:
                raise ValueError(f"GACBatchSampler: group {g} has no training samples; regroup "
                                 f"(e.g. over the classes present) or lower num_groups")
        self.labels, self.groups, self.batch_size = labels, groups, int(batch_size)
        self.seed, self.num_replicas, self.rank, self.drop_last = seed, num_replicas, rank, drop_last
        self.fill_size = math.ceil(round(fill * batch_size, 9))  # round: 0.14 * 50 is 7.000000000000001
        self.class_probs = gac_class_probs(counts, groups, rho, lam)
        self.by_class = np.argsort(labels, kind="stable")  # sample indices, grouped by class
        self.class_start, self.class_count = np.cumsum(counts) - counts, counts
        self.group_classes = [np.flatnonzero(groups == g) for g in range(self.num_groups)]
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _share(self, epoch):
        # SeedSequence ignores trailing zeros, so each stream starts with its own tag
        perm = np.random.default_rng([1, self.seed, epoch]).permutation(self.labels.size)
        total = math.ceil(perm.size / self.num_replicas) * self.num_replicas
        perm = np.resize(perm, total)  # pads by wrapping around
        return perm[self.rank::self.num_replicas]

    def _complete(self, group, rng):
        classes = self.group_classes[group]
        p = self.class_probs[classes]
        picked = classes[rng.choice(classes.size, size=self.fill_size, p=p / p.sum())]
        offset = rng.integers(0, self.class_count[picked])
        return self.by_class[self.class_start[picked] + offset]

    def epoch_batches(self, epoch):
        """[(base_indices, completion_indices)] of this rank's batches for `epoch`; the base parts
        are the rank's share of the permutation, the completions are the GAC top-ups."""
        share = self._share(epoch)
        rng = np.random.default_rng([2, self.seed, epoch, self.rank])
        out = []
        for i in range(len(self)):
            base = share[i * self.batch_size:(i + 1) * self.batch_size]
            present = np.zeros(self.num_groups, dtype=bool)
            present[self.groups[self.labels[base]]] = True
            fills = [self._complete(g, rng) for g in np.flatnonzero(~present)]
            out.append((base, np.concatenate(fills) if fills else np.zeros(0, dtype=np.int64)))
        return out

    def __iter__(self):
        for base, completion in self.epoch_batches(self.epoch):
            yield base.tolist() + completion.tolist()

    def __len__(self):
        per_rank = math.ceil(self.labels.size / self.num_replicas)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)


# --- 4. Per-group losses (Eq. 10) ---

def group_losses(logits, targets, class_to_group, num_groups, *, mode="class", class_counts=None):
    """The G objectives of Eq. (10): one cross-entropy loss per group of classes.

    logits: [B, K] (the caller may pass logit-adjusted logits; CE is over the full softmax),
    targets: LongTensor[B], class_to_group: LongTensor[K] on the logits' device.
    mode="class" (the paper: a group's gradient is the average of its classes' gradients):
        L_i = mean, over the classes of group i present in the batch, of that class's mean loss.
    mode="sample" (the authors' release): L_i = mean loss over the group's samples.
    class_counts: LongTensor[K], the per-class counts of the GLOBAL batch when the batch is split
        over ranks (default: bincount of targets). Every mean divides by these global counts, so
        the SUM over ranks of the local L_i equals the L_i of one process holding the whole batch.

    Returns (losses [G], present BoolTensor[G]). An absent group's loss is a zero connected to the
    graph (zero gradient). Do not feed it to MGDA: a zero gradient lies in the convex hull, so the
    min-norm direction would be zero and the step would do nothing. Use losses[present].
    """
    if mode not in ("class", "sample"):
        raise ValueError(f"group_losses: unknown mode {mode!r}; use mode='class' or mode='sample'")
    K = logits.shape[1]
    if class_to_group.numel() != K:
        raise ValueError(f"group_losses: class_to_group has {class_to_group.numel()} entries but "
                         f"logits have {K} classes; pass one group id per class")
    class_to_group = class_to_group.to(logits.device)
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    if class_counts is None:
        counts = torch.bincount(targets, minlength=K)
    else:
        counts = class_counts.to(logits.device)
        if bool((counts[targets] == 0).any()):
            raise ValueError("group_losses: class_counts is 0 for a class present in targets; pass "
                             "the global per-class counts (all_reduce of bincount(targets))")
    counts = counts.to(per_sample.dtype)
    zeros_G = per_sample.new_zeros(num_groups)
    if mode == "class":
        class_mean = per_sample.new_zeros(K).index_add(0, targets, per_sample) / counts.clamp(min=1)
        n = zeros_G.index_add(0, class_to_group, (counts > 0).to(per_sample.dtype))  # classes present
        total = zeros_G.index_add(0, class_to_group, class_mean)
    else:
        n = zeros_G.index_add(0, class_to_group, counts)                              # samples present
        total = zeros_G.index_add(0, class_to_group[targets], per_sample)
    present = n > 0
    losses = torch.where(present, total / n.clamp(min=1), logits.sum() * 0)
    return losses, present


# --- 5. Min-norm weights (Eq. 11, MGDA) ---

def _frank_wolfe(M, max_iter, tol):
    """Frank-Wolfe with exact line search on the rescaled Gram M (Sener & Koltun Alg. 2), in its
    pairwise form (Lacoste-Julien & Jaggi 2015): mass moves from the worst vertex in the support
    to the best one, which converges linearly where plain Frank-Wolfe crawls, and so finds the
    optimum's support for the polishing below. Starts at the best single gradient and keeps
    Ma = M a up to date, so an iteration costs O(G)."""
    t = int(np.argmin(np.diag(M)))
    a = np.zeros(M.shape[0])
    a[t] = 1.0
    Ma = M[t].copy()
    for _ in range(max_iter):
        s = int(np.argmin(Ma))
        v = int(np.argmax(np.where(a > 0, Ma, -np.inf)))
        gap = Ma[v] - Ma[s]  # >= the Frank-Wolfe duality gap, which bounds obj - optimum
        if gap <= tol:
            break
        curv = M[s, s] + M[v, v] - 2.0 * M[s, v]  # ||g_s - g_v||^2, > 0 whenever gap > 0
        gamma = min(a[v], gap / curv) if curv > 0 else a[v]
        a[v] = 0.0 if gamma >= a[v] else a[v] - gamma  # a "drop step" leaves an exact zero
        a[s] += gamma
        Ma += gamma * (M[s] - M[v])
    return a


def _affine_min(M_S):
    """argmin x^T M_S x subject to sum(x) = 1, from the KKT system [M_S 1; 1^T 0][x; -mu] = [0; 1].
    LU first (fast); least squares when it is singular (collinear gradients), which still gives
    an exact minimiser. A near-singular LU solve may stray far along a null direction of M_S; that
    costs nothing in the objective and the active-set step below walks back to feasibility."""
    s = M_S.shape[0]
    A = np.zeros((s + 1, s + 1))
    A[:s, :s] = M_S
    A[:s, s] = 1.0
    A[s, :s] = 1.0
    b = np.zeros(s + 1)
    b[s] = 1.0
    try:
        x = np.linalg.solve(A, b)[:s]
    except np.linalg.LinAlgError:
        x = np.full(s, np.nan)
    if not np.all(np.isfinite(x)):
        x = np.linalg.lstsq(A, b, rcond=None)[0][:s]
    return x if np.all(np.isfinite(x)) and abs(x.sum() - 1.0) < 1e-6 else None


def _active_set(M, a, max_steps, tol):
    """Polish a Frank-Wolfe point to the exact optimum with primal active-set steps: solve on the
    support, step back to feasibility (dropping coordinates that hit zero) or add the coordinate
    whose KKT gap is most negative. Every step is kept only if it does not raise the objective."""
    S = a > 0
    obj = float(a @ M @ a)
    for _ in range(max_steps):
        idx = np.flatnonzero(S)
        x = _affine_min(M[np.ix_(idx, idx)])
        if x is None:
            break
        if x.min() < -1e-12:  # infeasible: move towards x until the first coordinate hits zero
            step = a[idx] - x  # > 0 where x is below a
            hit = x < 0
            ratio = a[idx][hit] / step[hit]
            theta = min(1.0, float(ratio.min()))
            cand = a.copy()
            cand[idx] = a[idx] + theta * (x - a[idx])
            cand[idx[hit][ratio <= theta * (1 + 1e-12)]] = 0.0
        else:
            cand = np.zeros_like(a)
            cand[idx] = np.clip(x, 0.0, None)
        cand = np.clip(cand, 0.0, None)
        cand /= cand.sum()
        cand_obj = float(cand @ M @ cand)
        if cand_obj > obj + tol:
            break
        a, obj = cand, cand_obj
        S = a > 0
        if x.min() < -1e-12:
            continue
        gaps = M @ a - obj  # KKT: every gap >= 0, and 0 on the support
        j = int(np.argmin(gaps))
        if gaps[j] >= -tol or S[j]:
            break
        S[j] = True
    return a


def min_norm_weights(gram, *, max_iter=2000, tol=1e-12, polish_steps=50):
    """alpha = argmin over the simplex of alpha^T gram alpha (Eq. 11): the weights of the min-norm
    point of the convex hull of the gradients whose Gram matrix is `gram` [G, G].

    G = 2: closed form (Sener & Koltun 2018). G > 2: pairwise Frank-Wolfe with exact line search
    (at most max_iter steps, stopping at a KKT gap of tol) started at the best single gradient, so
    never worse than any one of them; then at most polish_steps active-set steps, each solving
    the KKT system on the support exactly, until the KKT conditions hold. Works in float64 on
    gram / max(diag), so norms from 1e-8 to 1e8 behave; zero, collinear and rank-deficient Grams
    give finite weights. Returns alpha [G] in gram's dtype and device.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"min_norm_weights: gram must be a square [G, G] matrix, got shape "
                         f"{tuple(gram.shape)}")
    G = gram.shape[0]
    out = dict(dtype=gram.dtype if gram.is_floating_point() else torch.float64, device=gram.device)
    if G == 0:
        raise ValueError("min_norm_weights: gram is empty (G = 0); pass at least one group")
    if G == 1:
        return torch.ones(1, **out)
    M = gram.detach().to("cpu", torch.float64).numpy()
    if not np.all(np.isfinite(M)):
        # Let the non-finite gradients reach p.grad, where e.g. a GradScaler skips the step.
        warnings.warn("min_norm_weights: gram has NaN/Inf entries (non-finite gradients); "
                      "using uniform weights - lower the learning rate or check the loss")
        return torch.full((G,), 1.0 / G, **out)
    M = (M + M.T) / 2.0
    scale = float(np.max(np.diag(M)))
    if not scale > 0:  # every gradient is zero: every alpha is optimal
        return torch.full((G,), 1.0 / G, **out)
    M = M / scale
    if G == 2:
        denom = M[0, 0] + M[1, 1] - 2.0 * M[0, 1]  # ||g1 - g2||^2
        gamma = (M[1, 1] - M[0, 1]) / denom if denom > 0 else 0.5
        gamma = min(1.0, max(0.0, gamma))
        a = np.array([gamma, 1.0 - gamma])
    else:
        a = _active_set(M, _frank_wolfe(M, max_iter, tol), polish_steps, tol)
        t = int(np.argmin(np.diag(M)))
        if a @ M @ a > M[t, t]:  # roundoff in the polish must not lose to the best single gradient
            a = np.eye(G)[t]
    return torch.as_tensor(a).to(**out)


# --- 6. The Pareto descent step (Eq. 12) ---

def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _norms(normalize, gram_diag, loss_values):
    """n_i of Sener & Koltun's gradient normalisations; a zero or invalid n_i falls back to 1."""
    if normalize == "none":
        n = torch.ones_like(loss_values)
    elif normalize == "l2":
        n = gram_diag.clamp(min=0).sqrt()
    elif normalize == "loss":
        n = loss_values.clone()
    else:
        n = loss_values * gram_diag.clamp(min=0).sqrt()
    return torch.where(torch.isfinite(n) & (n > 0), n, torch.ones_like(n))


def _solve(gram, loss_values, normalize):
    """Normalise the Gram to that of g_i / n_i and find alpha on it."""
    n = _norms(normalize, gram.diagonal(), loss_values)
    gram = gram / torch.outer(n, n)
    if gram.shape[0] > 1 and bool((gram.diagonal() == 0).any()):
        warnings.warn("mgda_backward: a group has a zero gradient, so the min-norm direction is zero "
                      "and this step does nothing; pass only present groups (losses[present])")
    return min_norm_weights(gram), n, gram


def mgda_backward(losses, params, *, gram_params=None, features=None, normalize="none",
                  retain_graph=False, return_gram=False):
    """Accumulate the Pareto descent direction d = sum_i alpha_i g_i / n_i into p.grad (Eq. 12).

    losses: G scalar tensors, one per PRESENT group. params: the parameters to update; only they
    receive gradient (frozen ones are skipped). alpha solves Eq. (11) for the normalised gradients
    g_i / n_i, with n_i = 1 ("none"), ||g_i|| ("l2"), L_i ("loss") or L_i ||g_i|| ("loss+").
    Because d is built from the same g_i / n_i that alpha was solved for, the min-norm optimality
    gives g_j . d >= n_j ||d||^2 > 0 for every group j: d lowers every group's loss. The authors'
    release instead applies alpha to the raw losses (d = sum alpha_i g_i, no 1/n_i), which mixes
    weights found for one set of vectors with another and loses that guarantee.

    Exact mode (features=None): one backward per group, Gram over gram_params (default: params;
    must be a subset, e.g. only the last shared layers to make the Gram cheaper), no extra
    backward for d. Features mode (features=z, the shared representation, MGDA-UB): the Gram of
    the gradients w.r.t. z (||g_i|| is then ||dL_i/dz||; gram_params is not used), then ONE
    backward of sum alpha_i L_i / n_i.

    Distributed (world size > 1, losses normalised with the global class counts): exact mode
    all-reduces the [G, P] gradients in one collective; features mode all-reduces the Gram (the
    ranks' samples are disjoint, so the global Gram is the sum) and this call's gradient. Every
    rank then adds the same d as one process holding the whole batch: do not also wrap the model
    in DistributedDataParallel. Loss values used by normalize are all-reduced too.

    Returns alpha (float64, [G]), and the Gram of the normalised gradients that alpha was solved
    on (the input of step_diagnostic) when return_gram.
    """
    if normalize not in ("none", "l2", "loss", "loss+"):
        raise ValueError(f"mgda_backward: unknown normalize {normalize!r}; "
                         f"use 'none', 'l2', 'loss' or 'loss+'")
    losses = list(losses)
    if not losses:
        raise ValueError("mgda_backward: no losses; pass at least one present group's loss")
    for i, L in enumerate(losses):
        if L.numel() != 1 or not L.requires_grad:
            raise ValueError(f"mgda_backward: losses[{i}] must be a scalar that requires grad "
                             f"(got shape {tuple(L.shape)}, requires_grad={L.requires_grad})")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("mgda_backward: no parameter requires grad; pass the model's parameters")
    device = params[0].device
    if any(p.device != device for p in params):
        raise ValueError("mgda_backward: params live on several devices; pass params on one device")
    where = {id(p): k for k, p in enumerate(params)}
    blocks = range(len(params)) if gram_params is None else [where.get(id(p)) for p in gram_params]
    if any(k is None for k in blocks):
        raise ValueError("mgda_backward: gram_params must be a subset of params (that require "
                         "grad); pass e.g. the shared backbone's last layers")
    G, distributed = len(losses), _world_size() > 1
    loss_values = torch.stack([L.detach().reshape(()) for L in losses]).to(device, torch.float64)
    if distributed and normalize in ("loss", "loss+"):
        dist.all_reduce(loss_values)

    if features is not None:
        feats = [features] if torch.is_tensor(features) else list(features)
        Z = [torch.autograd.grad(L, feats, retain_graph=True, allow_unused=True) for L in losses]
        gram = torch.zeros(G, G, dtype=torch.float64, device=device)
        for k, f in enumerate(feats):
            block = torch.stack([torch.zeros_like(f) if z[k] is None else z[k] for z in Z])
            block = block.reshape(G, -1).to(device, torch.float64)
            gram += block @ block.T
        del Z
        if distributed:
            dist.all_reduce(gram)
        alpha, n, gram = _solve(gram, loss_values, normalize)
        w = (alpha / n).detach()
        total = sum(w[i].to(L.device, L.dtype) * L.reshape(()) for i, L in enumerate(losses))
        grads = torch.autograd.grad(total, params, retain_graph=retain_graph, allow_unused=True)
        if distributed:  # one collective for this call's gradient, not for what p.grad held before
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for p, g in zip(params, grads)])
            dist.all_reduce(flat)
            grads = [s.view_as(p) for s, p in zip(flat.split([p.numel() for p in params]), params)]
        for p, g in zip(params, grads):
            if g is not None:
                _accumulate(p, g)
        return (alpha, gram) if return_gram else alpha

    sizes = [p.numel() for p in params]
    offsets = np.cumsum([0] + sizes).tolist()
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.zeros(G, offsets[-1], dtype=dtype, device=device)  # row i holds g_i
    for i, L in enumerate(losses):
        keep = retain_graph or i < G - 1
        grads = torch.autograd.grad(L, params, retain_graph=keep, allow_unused=True)
        for p, g, o in zip(params, grads, offsets):
            if g is not None:
                flat[i, o:o + p.numel()].view_as(p).copy_(g)
        del grads
    if distributed:
        dist.all_reduce(flat)

    gram = torch.zeros(G, G, dtype=torch.float64, device=device)
    for k in dict.fromkeys(blocks):  # blockwise in float64: no TF32, no [G, P] float64 copy
        s = flat[:, offsets[k]:offsets[k + 1]].to(torch.float64)
        gram += s @ s.T
    alpha, n, gram = _solve(gram, loss_values, normalize)
    d = (alpha / n).to(dtype) @ flat
    for p, o in zip(params, offsets):
        _accumulate(p, d[o:o + p.numel()].view_as(p))
    return (alpha, gram) if return_gram else alpha


def _accumulate(p, g):
    """p.grad += g, as .backward() would (creating p.grad if it is None)."""
    if p.grad is None:
        p.grad = g.detach().clone().to(p.dtype)
    else:
        p.grad.add_(g.to(p.grad.dtype))


def step_diagnostic(gram, alpha, losses):
    """What one MGDA step did, from the Gram only: alpha, each group's loss, cos(d, g_i) for every
    group (all >= 0 at the min-norm point: the Pareto descent property) and ||d||. Pass the Gram
    returned by mgda_backward(..., return_gram=True) (that of the normalised g_i / n_i; cosines do
    not depend on n_i > 0, and ||d|| is then the norm of the applied update over gram_params)."""
    gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
    alpha = torch.as_tensor(alpha).detach().to("cpu", torch.float64)
    Ma = gram @ alpha
    d_sq = float(alpha @ Ma)
    d_norm = math.sqrt(max(d_sq, 0.0))
    g_norm = gram.diagonal().clamp(min=0).sqrt()
    denom = d_norm * g_norm
    cos = torch.where(denom > 0, Ma / denom.clamp(min=1e-300), torch.zeros_like(Ma))
    return {
        "alpha": alpha.tolist(),
        "losses": [float(torch.as_tensor(L).detach()) for L in losses],
        "cos": cos.tolist(),
        "d_norm": d_norm,
    }
