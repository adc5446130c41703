"""
GBG: Gradient-Balancing Grouping (Li et al., "Long-Tailed Learning as Multi-Objective
Optimization", AAAI 2024).

Stage 1 groups the K classes by the direction of their loss gradients; stage 2 trains with one
loss per group, and every step follows a direction that lowers all the group losses at once.
With a `model` whose classifier is `model.fc`, a `dataset` of (input, class id) pairs (augmented),
`plain_dataset`, the same samples without augmentation, its class ids `labels` [N], `num_classes`,
a `batch_size`, `warmup_epochs`, a number of `epochs` and an `optimizer`:

Usage::

    import torch
    import gbg

    num_groups = 4  # G, the paper's choice
    # Warm-up: plain CE first (groups of the untrained model agree across seeds no better than chance)
    for epoch in range(warmup_epochs):
        for x, y in torch.utils.data.DataLoader(dataset, batch_size, shuffle=True):
            optimizer.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); optimizer.step()
    # Stage 1, once: class gradients of the backbone (un-augmented) -> cosine affinity -> NCut groups
    backbone = [p for name, p in model.named_parameters() if not name.startswith("fc.")]
    grads = gbg.class_gradients(model, plain_dataset, num_classes, backbone)
    groups = gbg.ncut_groups(gbg.affinity(grads), num_groups)
    # Stage 2: every batch holds every group (GAC sampler); one MGDA step over the group losses
    sampler = gbg.GACBatchSampler(labels, groups, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    for epoch in range(warmup_epochs, epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            losses, present = gbg.group_losses(model(x), y, groups, num_groups)
            optimizer.zero_grad()
            step = gbg.mgda_backward(losses[present], model.parameters())  # adds d to every p.grad
            optimizer.step()

step["alpha"] holds the weights MGDA gave the groups (tests/test_usage.py runs this example).

The core, in the order a user calls it and of this file (the paper's order, except that the paper
describes the GAC sampler after the step, in Sec. 3 and its appendix):
    class_gradients   each class's mean cross-entropy gradient over `params`, [K, D] (Alg. 1).
                      Recalibrates BatchNorm first (the default, as train.py);
                      recalibrate_bn=False is the paper's setting.
    affinity          their cosine similarity A, [K, K] (Eq. 7)
    ncut_groups       spectral normalised cut of the graph A + 1 into G groups, int64 [K]
                      (Eq. 8-9)
    GACBatchSampler   batches that hold every group: a group a batch misses is topped up with
                      ceil(B/10) of its samples, classes drawn with effective-number weights
                      (gac_class_probs; the paper's appendix)
    group_losses      one cross-entropy loss per group [G], and which groups are present (Eq. 10)
    mgda_backward     THE step: one gradient per group, their min-norm weights alpha (Eq. 11,
                      min_norm_weights), then p.grad += d = sum_i w_i g_i (Eq. 12, Alg. 2). Its
                      defaults (normalize="l2", update="scaled") are train.py's;
                      normalize="none" solves the paper's Eq. 11 on the raw gradients.
                      Its parts, for a custom step: group_gradients, mgda_weights,
                      weighted_backward.
Groups may be a numpy array or a tensor wherever they are passed: what one function returns, the
next accepts.

Extras, after the "Extras" banner; none of them is needed to train:
    sketching         class_gradients(sketch_dim=m): CountSketch rows when K x P is too large
    choosing G        choose_num_groups: G from the affinity's eigengaps (beyond the paper)
    groupings         random_groups, count_bins_groups (Table 5's baselines), count_groups,
                      ncut_value (the NCut objective by which Eq. 9 is solved),
                      adjusted_rand_index (how far two groupings agree)
    last-stage step   mgda_backward_partial: alpha from the last stage's gradients, then one
                      full backward
    MGDA-UB step      mgda_backward_features: alpha from the gradients w.r.t. the shared
                      representation z and the classifier's parameters (Sener & Koltun 2018,
                      Sec. 3.3), then one full backward
    diagnostics       pareto_cosines, step_diagnostic, class_update_cosines (Fig. 2)

This module needs only torch, numpy and scipy. It keeps no global state, and it communicates
between processes only inside the functions that take a `process_group`, when one is passed.
"""

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2


# --- Helpers: devices, arrays, label counts -------------------------------------------------------

def _same_device(a, b):
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def to_device(t, device):
    """t on `device` without making the host wait: a CPU tensor bound for a GPU is staged in pinned
    memory and copied with non_blocking=True (a copy from pageable memory waits for the device's
    queue to drain first). A copy to the CPU blocks: a non-blocking one could be read before the
    device has written it. A tensor already there comes back as it is."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=t.device.type == "cpu")  # from the host only


def _numpy(x, dtype=None):
    """x (a tensor on any device, a numpy array or a list) as a flat numpy array: group ids and
    class counts may come either way, e.g. ncut_groups' numpy output or a tensor on the GPU."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def count_labels(targets, num_classes):
    """Samples per class, int64 [num_classes], on the targets' device. A fixed-size scatter, where
    torch.bincount would read the largest label back to the host to size its output (on a GPU,
    a synchronisation every step)."""
    return torch.zeros(num_classes, dtype=torch.long, device=targets.device).index_add_(
        0, targets, torch.ones_like(targets))


# --- 1. Class gradients and their affinity (Eq. 7) ------------------------------------------------

def _dataset_labels(dataset):
    """Labels of a map-style dataset: `dataset.targets` if it has one, else one pass over it."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    elif torch.is_tensor(targets):
        targets = targets.cpu().numpy()
    return np.asarray(targets, dtype=np.int64).reshape(-1)


def class_gradients(model, dataset, num_classes, params, *, batch_size=256, max_per_class=None,
                    sketch_dim=None, device=None, seed=0, classes=None, num_workers=0,
                    recalibrate_bn=True, return_info=False, worker_init_fn=None, fetch=None):
    """Mean per-sample cross-entropy gradient of each class, as a float32 CPU tensor [K, D].

    `params`: the parameters to differentiate, e.g. the backbone's (the authors leave the
    classifier out). They are required: "everything but the last nn.Linear" is not the classifier
    of every model (a projection head may come after it). D is their total numel, or `sketch_dim`.

    The model runs in eval mode (BatchNorm uses its running statistics, so a sample's gradient
    does not depend on its batch mates); each module's previous mode is restored afterwards.

    `recalibrate_bn` (default True, as train.py): first re-estimate every BatchNorm's running
    statistics on the samples the gradients use (see _recalibrate_bn). At initialisation the
    running statistics are the placeholders mean 0 / var 1, so eval mode does not normalise at
    all: a CIFAR ResNet-32 then outputs logits in the hundreds, softmax saturates, and every class
    gradient but the predicted class's points the same way. The statistics are restored
    afterwards, so grouping never changes the model. The paper's setting (Alg. 1: the model's
    eval-mode outputs as they are) is recalibrate_bn=False; a model without BatchNorm gets the
    same rows either way.

    `return_info`: also return {"max_softmax_mean": mean over the samples used of the largest
    softmax probability, "samples": how many}; near 1 means saturated outputs.

    `fetch`: a function from a LongTensor of indices on `device` to the batch (x, y) of those
    samples on `device` (e.g. data_lt.TensorImages.batch), used in place of a DataLoader over
    dataset[i]. For a data set held on a GPU it gathers whole batches: per sample, dataset[i]
    would read each label back to the host (about 25,000 waits for the GPU on CIFAR-10-LT). With
    it, the host reads the device three times a call: the labels, the rows, the confidence.

    Cost is about one forward+backward over the samples: every batch holds ONE class, so the
    gradient of the summed loss is that class's gradient sum; the sums are divided by the counts.

    `max_per_class` caps each class at a seeded random subset. `classes` restricts the work to
    those rows (the others stay zero), so processes can share the classes and sum the rows; the
    subsets and the sketch depend only on `seed`, never on which process computes a row.

    `sketch_dim=m`: rows of m numbers, a seeded CountSketch of the exact ones, for when K x D
    floats do not fit (see "Extras: sketched class gradients" for the method and its error).
    """
    model_device = next(model.parameters()).device
    device = model_device if device is None else torch.device(device)
    if not _same_device(device, model_device):
        raise ValueError(f"class_gradients: the model is on {model_device} but device={device}; "
                         f"move the model there first or leave device=None")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("class_gradients: no parameters to differentiate; pass the backbone's "
                         "parameters (that require grad) as params")
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
    used = {}
    for k in range(num_classes):
        idx = order[starts[k]:starts[k + 1]]
        if max_per_class is not None and idx.size > max_per_class:  # tag 4: a stream of its own
            idx = np.sort(np.random.default_rng([4, seed, k]).choice(idx, max_per_class, replace=False))
        if idx.size:
            used[k] = idx
    members = {k: used[k] for k in wanted if k in used}
    empty = [k for k in wanted if k not in used]
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
    # the rows stay on the device until the end (one copy back); at most 2 GB (train.py sketches above)
    out = torch.zeros(num_classes, dim, dtype=torch.float32, device=device)
    if sketch_dim is not None:
        h, s = (to_device(t, device) for t in _count_sketch_hashes(num_params, dim, seed))
    dtype = params[0].dtype  # lets a float64 model take float32 images
    # summed on the device, read once: the largest softmax probabilities, and labels != the class
    tally, seen = torch.zeros(2, dtype=torch.float64, device=device), 0
    pinned = device.type == "cuda"

    def load(batch_list):
        if fetch is not None:  # the indices go to the device in one copy; each batch is one gather
            flat = torch.as_tensor(np.concatenate(batch_list) if batch_list else np.zeros(0), dtype=torch.long)
            return (fetch(i) for i in to_device(flat, device).split([len(b) for b in batch_list]))
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_list, num_workers=num_workers,
                                           worker_init_fn=worker_init_fn, pin_memory=pinned)

    modes = [(m, m.training) for m in model.modules()]
    saved_bn = None
    try:
        if recalibrate_bn:
            # Over ALL classes' samples (not only `classes`), so every process gets the same
            # statistics; mixed-class batches, as in training (one-class batches would see only
            # the within-class variance).
            everything = np.sort(np.concatenate(list(used.values()))) if used else np.zeros(0, np.int64)
            shuffled = np.random.default_rng([3, seed]).permutation(everything)
            chunks = [shuffled[i:i + batch_size].tolist() for i in range(0, shuffled.size, batch_size)]
            if len(chunks) > 1 and len(chunks[-1]) == 1:  # BatchNorm1d refuses a batch of one
                last = chunks.pop()
                chunks[-1] += last
            saved_bn = _recalibrate_bn(model, load(chunks), device, dtype)
        model.eval()
        running, current = None, None
        for k, batch in zip(batch_class, load(batches)):
            if k != current:  # batches of a class are consecutive: flush the finished class
                if current is not None:
                    out[current] = (running / members[current].size).float()
                running, current = torch.zeros(dim, dtype=torch.float64, device=device), k
            x, y = batch[0], torch.as_tensor(batch[1])
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, non_blocking=pinned)
            y = y.to(device, non_blocking=pinned)
            with torch.enable_grad():
                logits = model(x)
                loss = F.cross_entropy(logits, y, reduction="sum")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            tally += torch.stack([logits.detach().double().softmax(1).amax(1).sum(), (y != k).sum().double()])
            seen += len(y)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for g, p in zip(grads, params)]).double()
            if sketch_dim is None:
                running += flat
            else:
                running.index_add_(0, h, flat * s)
        if current is not None:
            out[current] = (running / members[current].size).float()
    finally:
        for m, mode in modes:
            m.training = mode
        if saved_bn is not None:
            _restore_bn(saved_bn)
    confidence, mismatched = tally.tolist()
    if mismatched:
        raise ValueError("class_gradients: the labels of the batches (dataset[i][1], or fetch) disagree with "
                         "dataset.targets; make the two label sources agree")
    out = out.cpu()
    if return_info:
        return out, {"max_softmax_mean": confidence / max(seen, 1), "samples": seen}
    return out


def _recalibrate_bn(model, loader, device, dtype):
    """Replace every BatchNorm's running statistics by the average of the batch statistics over
    `loader` (a no-grad pass in train mode), each batch weighted by its size, so the running mean
    is the mean over all the samples even when the last batch is short; return what is needed to
    restore them. Each BatchNorm runs as a plain local F.batch_norm during the pass, even a synchronised
    one: every process sees the same samples, so no collective is needed (and none may run, since
    the other processes might be elsewhere)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    seen = [0, 1.0]  # samples so far, this batch's weight; on the host (no device reads)

    def local_forward(m):
        def forward(x):  # momentum n_t / (n_1 + ... + n_t): a running average over samples
            m.num_batches_tracked += 1
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, True,
                                seen[1], m.eps)
        return forward

    for m in bns:
        m.reset_running_stats()
        m.forward = local_forward(m)  # an instance attribute: shadows the class's forward
    model.train()
    try:
        with torch.no_grad():
            for x, _ in loader:
                seen[0] += len(x)
                seen[1] = len(x) / seen[0]
                model(x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype,
                           non_blocking=device.type == "cuda"))
    finally:
        for m in bns:
            del m.forward
    return saved


def _restore_bn(saved):
    for m, buffers in saved:
        for k, v in buffers.items():
            getattr(m, k).copy_(v)


def affinity(class_grads):
    """Cosine similarity of the class gradients (Eq. 7), float64 [K, K]. A zero row (a class
    without samples) has affinity 0 to the others and 1 to itself."""
    g = torch.as_tensor(class_grads).double()
    norm = g.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, g / norm.clamp_min(1e-300), torch.zeros_like(g))
    A = (unit @ unit.T).clamp(-1.0, 1.0)
    A.fill_diagonal_(1.0)
    return A


# --- 2. Normalised-cut grouping of the affinity graph (Eq. 8-9) -----------------------------------
#
# Eq. 8 sums the affinity between two groups, a(V_m, V_n) = sum of A_ij over i in V_m, j in V_n;
# Eq. 9 asks for the partition into G groups with the least affinity between groups. The paper
# solves it with Shi & Malik's normalised cut, sum over groups V of a(V, rest) / a(V, all)
# (ncut_value), on W = A + 1 (the authors' shift: NCut needs non-negative weights).

def _check_num_groups(num_groups, num_classes):
    if not 1 <= num_groups <= num_classes:
        raise ValueError(f"num_groups={num_groups} must be between 1 and the number of classes "
                         f"K={num_classes}")


def _canonical(groups):
    """Relabel groups by their smallest class id, so equal partitions give equal arrays."""
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first)).astype(np.int64)[inverse.reshape(-1)]


def _graph_weights(A):
    """The class graph that NCut cuts: W = affinity + 1 off the diagonal, W_ii = 0.

    Cosines lie in [-1, 1]; the +1 shift (the release's utils.py, ~l.147) makes the weights
    non-negative. No self-loops: Ng, Jordan & Weiss (the paper's spectral clustering) set
    A_ii = 0, and the release's scikit-learn `spectral_clustering` builds its Laplacian with
    scipy.sparse.csgraph.laplacian, which ignores the diagonal. A self-loop W_ii = 2 would be a
    fifth of every degree at K = 10 and pull the embedding towards the identity."""
    A = torch.as_tensor(A).double().cpu().numpy()
    if A.ndim != 2 or A.shape[0] != A.shape[1] or not np.isfinite(A).all():
        raise ValueError(f"affinity must be a finite square matrix, got shape {A.shape}")
    W = np.clip((A + A.T) / 2 + 1.0, 0.0, None)
    np.fill_diagonal(W, 0.0)
    return W


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


# What ncut_groups cuts and how it labels, as groups.json records them.
NCUT_GRAPH = "W = affinity + 1 off the diagonal, no self-loops (W_ii = 0)"
NCUT_ASSIGN = ("kmeans", "cluster_qr")


def _cluster_qr(V):
    """Damle, Minden & Ying (2019), "Simple, direct and efficient multi-way spectral clustering":
    QR with column pivoting of V^T [G, K] picks G well-separated classes, the SVD of their rows
    gives the rotation (its polar factor) that takes them closest to the G axes, and each class
    goes to the axis of largest |coordinate|. No seed, no restarts. As scikit-learn's
    `cluster_qr` (sklearn/cluster/_spectral.py l.23-52, 1.9.1), which the release calls."""
    G = V.shape[1]
    _, _, piv = scipy.linalg.qr(V.T, pivoting=True)
    u, _, vh = scipy.linalg.svd(V[piv[:G]].T)
    return np.abs(V @ (u @ vh)).argmax(axis=1)


def _ncut_embedding(W, num_groups):
    """The G leading eigenvectors U [K, G] of D^-1/2 W D^-1/2, i.e. those of the G smallest
    eigenvalues of the normalised Laplacian I - D^-1/2 W D^-1/2, which relax the NCut indicator
    vectors; and the degrees d = W 1."""
    K = W.shape[0]
    d = np.maximum(W.sum(1), 1e-12)
    M = W / np.sqrt(np.outer(d, d))
    _, U = scipy.linalg.eigh(M, subset_by_index=[K - num_groups, K - 1])
    return U, d


def ncut_groups(affinity, num_groups, *, seed=0, n_init=10, assign="kmeans"):
    """Partition the K classes into G groups by spectral normalised cut (Shi & Malik) of the graph
    _graph_weights(affinity) (NCUT_GRAPH). Returns int64 group ids [K] as a numpy array (every
    function here takes groups as numpy or as a tensor), labelled in order of their smallest class
    id.

    assign="kmeans" (default): the G leading eigenvectors of D^-1/2 W D^-1/2 with unit rows (Ng,
        Jordan & Weiss), seeded k-means++ with n_init restarts, the lowest k-means cost kept;
        every group non-empty; deterministic for a seed.
    assign="cluster_qr": the release's grouping (WickyLee1998/GBG_v1 utils.py l.147: scikit-
        learn's `spectral_clustering(affinity=cos + 1, assign_labels="cluster_qr")`): the same
        eigenvectors divided by sqrt(degree), as scikit-learn's spectral embedding
        (sklearn/manifold/_spectral_embedding.py, `embedding / dd`), then _cluster_qr. seed and
        n_init are unused. Like scikit-learn it can leave a group empty (an axis no class is
        nearest to); the groups are then fewer than G, with a warning, as the release would have
        them (it skips empty groups)."""
    if assign not in NCUT_ASSIGN:
        raise ValueError(f"unknown assign {assign!r}; use 'kmeans' or 'cluster_qr'")
    W = _graph_weights(affinity)
    K = W.shape[0]
    _check_num_groups(num_groups, K)
    if num_groups == 1:
        return np.zeros(K, dtype=np.int64)
    if num_groups == K:
        return np.arange(K, dtype=np.int64)

    U, d = _ncut_embedding(W, num_groups)
    if assign == "cluster_qr":
        labels = _cluster_qr(U / np.sqrt(d)[:, None])
        found = np.unique(labels).size
        if found < num_groups:
            warnings.warn(f"ncut_groups: cluster_qr left {num_groups - found} of {num_groups} groups empty; "
                          f"returning {found} groups", stacklevel=2)
        return _canonical(labels)
    # unit rows make the k-means step scale free
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


# --- 3. GAC sampler (appendix): a missing group topped up with ceil(B/10) of its samples ----------

def gac_class_probs(class_counts, groups, rho=0.9999, lam=1e-5):
    """P_j: the probability that a completion of group i draws class j (sums to 1 per group): the
    appendix's effective-number weights p_j, beta_i and P_j.

    p_j = (1 - beta_i) / (1 - beta_i ** N_j) is the class-balanced weight of Cui et al. (2019),
    normalised within the group: P_j = p_j / sum of p_j over the group's m classes (the appendix's
    normalisation runs over the classes, so P is a distribution over classes: a completion draws
    class j with P_j, then one of its samples). The paper's formula for beta_i is garbled; OUR
    READING:
        beta_i = rho + lam * delta_i,  delta_i = log(N_max,i / N_min,i) / log(N_max / N_min),
    the group's log imbalance relative to the whole training set's (0 on a balanced set), so a
    more imbalanced group gets beta closer to 1 and weights closer to inverse frequency.
    Classes without samples get probability 0.

    rho = 0.9999 and lam = 1e-5 are the values of the authors' release (GBG_v1 sampler.py,
    CBEffectNumSampler: beta_a, beta_b); the paper prints rho and a garbled lam. That sampler is
    not GAC (the release trains with shuffled batches): it draws from the whole training set,
    weights each SAMPLE by p_j (a class then comes with probability ~ N_j p_j, near balanced
    classes, where P_j here is near inverse frequency) and takes delta per class,
    (log N_max - log N_j) / (log N_max - log N_min), where ours is per group.
    """
    counts = _numpy(class_counts, np.float64)
    groups = _numpy(groups, np.int64)
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

    The paper's rule (appendix): a group missing from a batch of B is topped up with ceil(B/10)
    of its samples (fill=0.1), each from a class j drawn with the effective-number weight P_j of
    gac_class_probs, then a uniform sample of that class. labels [N] and groups [K] may be
    tensors, numpy arrays (ncut_groups' output) or lists.

    One GLOBAL batch is built per step, identically on every replica, and each replica takes its
    share, so a run on R processes sees exactly the batches of one process (up to the pad below):
    each epoch shuffles all N indices with a generator seeded by (seed, epoch), wrapped to a
    multiple of R (like DistributedSampler), and cuts them into global batches of
    R * batch_size (`batch_size` is the per-replica size). Every group a global batch misses is
    topped up with ceil(fill * R * batch_size) of its samples: a class j ~ P_j (gac_class_probs),
    then a uniform sample of j, drawn with a generator seeded by (seed, epoch) alone. Replica r
    takes base[r::R] and completion[r::R] of each global batch, so the union of the replicas'
    t-th batches is the one-process t-th batch. Call set_epoch(epoch) before iterating, as with
    DistributedSampler.

    A batch misses at most G - 1 groups, so it can grow by (G - 1) * ceil(fill * B) samples. With
    many small groups (every class its own group, say) that is many times the batch; the sampler
    refuses when the worst case exceeds `max_growth` times the global batch.
    """

    def __init__(self, labels, groups, batch_size, *, rho=0.9999, lam=1e-5, fill=0.1, seed=0,
                 num_replicas=1, rank=0, drop_last=False, max_growth=2.0):
        labels = _numpy(labels, np.int64)
        groups = _numpy(groups, np.int64)
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
        self.global_batch = self.batch_size * num_replicas
        # round: 0.14 * 50 is 7.000000000000001 in floats
        self.fill_size = math.ceil(round(fill * self.global_batch, 9))
        worst = (self.num_groups - 1) * self.fill_size
        if worst > max_growth * self.global_batch:
            raise ValueError(f"GAC with {self.num_groups} groups and fill {fill:g} can add up to "
                             f"{self.num_groups - 1} x {self.fill_size} = {worst} top-up samples to a batch "
                             f"of {self.global_batch} (over {max_growth:g}x the batch); use fewer groups, a "
                             f"smaller fill, or plain shuffled batches")
        self.class_probs = gac_class_probs(counts, groups, rho, lam)
        self.by_class = np.argsort(labels, kind="stable")  # sample indices, grouped by class
        self.class_start, self.class_count = np.cumsum(counts) - counts, counts
        self.group_classes = [np.flatnonzero(groups == g) for g in range(self.num_groups)]
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _permutation(self, epoch):
        # SeedSequence ignores trailing zeros, so each stream starts with its own tag
        perm = np.random.default_rng([1, self.seed, epoch]).permutation(self.labels.size)
        total = math.ceil(perm.size / self.num_replicas) * self.num_replicas
        return np.resize(perm, total)  # pads by wrapping around: every replica gets a sample

    def _complete(self, group, rng):
        classes = self.group_classes[group]
        p = self.class_probs[classes]
        picked = classes[rng.choice(classes.size, size=self.fill_size, p=p / p.sum())]
        offset = rng.integers(0, self.class_count[picked])
        return self.by_class[self.class_start[picked] + offset]

    def global_batches(self, epoch):
        """[(base_indices, completion_indices)] of the global batches of `epoch`: the same on
        every replica (the generators depend on (seed, epoch) only)."""
        perm = self._permutation(epoch)
        rng = np.random.default_rng([2, self.seed, epoch])
        out = []
        for i in range(len(self)):
            base = perm[i * self.global_batch:(i + 1) * self.global_batch]
            present = np.zeros(self.num_groups, dtype=bool)
            present[self.groups[self.labels[base]]] = True
            fills = [self._complete(g, rng) for g in np.flatnonzero(~present)]
            out.append((base, np.concatenate(fills) if fills else np.zeros(0, dtype=np.int64)))
        return out

    def epoch_batches(self, epoch):
        """[(base_indices, completion_indices)] of this replica's batches for `epoch`: its share
        (every R-th index, from its rank on) of each global batch's base and completion."""
        R, r = self.num_replicas, self.rank
        return [(base[r::R], completion[r::R]) for base, completion in self.global_batches(epoch)]

    def __iter__(self):
        for base, completion in self.epoch_batches(self.epoch):
            yield base.tolist() + completion.tolist()

    def __len__(self):
        total = math.ceil(self.labels.size / self.num_replicas) * self.num_replicas
        return total // self.global_batch if self.drop_last else math.ceil(total / self.global_batch)


# --- 4. Per-group losses (Eq. 10) -----------------------------------------------------------------

def group_losses(logits, targets, class_to_group, num_groups, *, mode="class", class_counts=None,
                 validate=True):
    """The G objectives of Eq. (10): one cross-entropy loss per group of classes.

    logits: [B, K] (the caller may pass logit-adjusted logits; CE is over the full softmax),
    targets: LongTensor[B], class_to_group: the group id of every class [K], a tensor or a numpy
    array (ncut_groups' output as it is); a LongTensor on the logits' device spares a copy a step.
    mode="class" (the paper: a group's gradient is the average of its classes' gradients):
        L_i = mean, over the classes of group i present in the batch, of that class's mean loss.
    mode="sample" (the authors' release): L_i = mean loss over the group's samples.
    class_counts: [K] (a tensor or numpy), the per-class counts of the GLOBAL batch when the batch
        is split over ranks (default: bincount of targets). Every mean divides by these global
        counts, so the SUM over ranks of the local L_i equals the L_i of one process holding the
        whole batch.

    validate: check that class_counts covers every target (one host read; a caller that built the
    counts from the targets, as train.py does, passes False and keeps the step free of host reads).

    Returns (losses [G], present BoolTensor[G]). An absent group's loss is a zero connected to the
    graph (zero gradient). Do not feed it to MGDA: a zero gradient lies in the convex hull, so the
    min-norm direction would be zero and the step would do nothing. Use losses[present].
    """
    if mode not in ("class", "sample"):
        raise ValueError(f"group_losses: unknown mode {mode!r}; use mode='class' or mode='sample'")
    K = logits.shape[1]
    if not torch.is_tensor(class_to_group) and len(class_to_group) and \
            not 0 <= np.min(class_to_group) <= np.max(class_to_group) < num_groups:  # host data: no device read
        raise ValueError(f"group_losses: group ids must be in [0, num_groups={num_groups}), found "
                         f"[{np.min(class_to_group)}, {np.max(class_to_group)}]; pass the number of "
                         f"groups the grouping made")
    class_to_group = torch.as_tensor(class_to_group)  # ncut_groups' numpy output as it is
    if class_to_group.numel() != K:
        raise ValueError(f"group_losses: class_to_group has {class_to_group.numel()} entries but "
                         f"logits have {K} classes; pass one group id per class")
    class_to_group = class_to_group.to(logits.device, torch.long)
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    if class_counts is None:
        counts = count_labels(targets, K)
    else:
        counts = torch.as_tensor(class_counts).to(logits.device)
        if validate and bool((counts[targets] == 0).any()):
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


# --- 5. Min-norm weights (Eq. 11, MGDA) -----------------------------------------------------------

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
        if gap <= tol * (a @ Ma):  # relative: the optimum may be many orders below max(diag)
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
        if cand_obj > obj * (1.0 + tol):
            break
        a, obj = cand, cand_obj
        S = a > 0
        if x.min() < -1e-12:
            continue
        gaps = M @ a - obj  # KKT: every gap >= 0, and 0 on the support
        j = int(np.argmin(gaps))
        if gaps[j] >= -tol * obj or S[j]:
            break
        S[j] = True
    return a


def min_norm_weights(gram, *, max_iter=2000, tol=1e-12, polish_steps=50):
    """alpha = argmin over the simplex of alpha^T gram alpha (Eq. 11): the weights of the min-norm
    point of the convex hull of the gradients whose Gram matrix is `gram` [G, G].

    G = 2: closed form (Sener & Koltun 2018). G > 2: pairwise Frank-Wolfe with exact line search
    (at most max_iter steps, stopping when the duality gap is below tol times the current
    objective) started at the best single gradient, so never worse than any one of them; then at
    most polish_steps active-set steps, each solving the KKT system on the support exactly, until
    the KKT conditions hold to tol relative to the objective. Every tolerance is relative to the
    objective, not to the largest gradient: with norms spanning 1e-4..1e4 the optimum may lie 16
    orders below max(diag), and an absolute rule would stop far above it. Works in float64 on
    gram / max(diag); zero, collinear and rank-deficient Grams give finite weights. Returns
    alpha [G] in gram's dtype and device.

    Most users call mgda_backward, which solves this on the group gradients and takes the step.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"min_norm_weights: gram must be a square [G, G] matrix, got shape "
                         f"{tuple(gram.shape)}")
    if gram.shape[0] == 0:
        raise ValueError("min_norm_weights: gram is empty (G = 0); pass at least one group")
    out = dict(dtype=gram.dtype if gram.is_floating_point() else torch.float64, device=gram.device)
    a = _min_norm(gram.detach().to("cpu", torch.float64).numpy(), max_iter, tol, polish_steps)
    return torch.as_tensor(a).to(**out)


def _min_norm(M, max_iter=2000, tol=1e-12, polish_steps=50):
    """min_norm_weights on a float64 numpy Gram; returns numpy alpha."""
    G = M.shape[0]
    if G == 1:
        return np.ones(1)
    if not np.all(np.isfinite(M)):
        # Let the non-finite gradients reach p.grad, where e.g. a GradScaler skips the step.
        warnings.warn("min_norm_weights: gram has NaN/Inf entries (non-finite gradients); "
                      "using uniform weights - lower the learning rate or check the loss")
        return np.full(G, 1.0 / G)
    M = (M + M.T) / 2.0
    scale = float(np.max(np.diag(M)))
    if not scale > 0:  # every gradient is zero: every alpha is optimal
        return np.full(G, 1.0 / G)
    M = M / scale
    if G == 2:
        denom = M[0, 0] + M[1, 1] - 2.0 * M[0, 1]  # ||g1 - g2||^2
        gamma = (M[1, 1] - M[0, 1]) / denom if denom > 0 else 0.5
        gamma = min(1.0, max(0.0, gamma))
        return np.array([gamma, 1.0 - gamma])
    a = _active_set(M, _frank_wolfe(M, max_iter, tol), polish_steps, tol)
    t = int(np.argmin(np.diag(M)))
    if a @ M @ a > M[t, t]:  # roundoff in the polish must not lose to the best single gradient
        a = np.eye(G)[t]
    return a


# --- 6. The Pareto descent step (Eq. 12, Alg. 2): mgda_backward -----------------------------------

#
# Every step below builds d = sum_i w_i g_i from the RAW group gradients g_i, with weights w_i
# derived from the min-norm alpha of the normalised gradients g_i / n_i (update rules):
#   "scaled" (default): w_i = (alpha_i / n_i) / sum_j (alpha_j / n_j). d is a positive multiple of
#       the min-norm point sum_i alpha_i g_i / n_i, so it keeps its descent property
#       (g_j . d >= 0 for every group j, over the Gram's parameters: all of them by default), and
#       its weights sum to 1: d is a convex combination of
#       the raw gradients, of their size, and d = g when every g_i equals the same g. With
#       normalize "none" (n_i = 1) this is the paper's update theta <- theta - eta sum alpha_i grad L_i.
#   "raw": w_i = alpha_i, alpha found on g_i / n_i and applied to the raw g_i: Sener & Koltun's
#       code and the authors' release. NOT guaranteed to lower every group's loss when n_i differ.
#   "normalized": w_i = alpha_i / n_i, the min-norm point itself; under "l2" its norm (over the
#       Gram's parameters) is <= 1 whatever the gradients' size, so it takes far shorter steps than a CE step at the same lr.

def _all_reduce(t, process_group):
    """Sum t over process_group in place; no collective when process_group is None. The one
    place where this module communicates: it only does when the caller passes a group."""
    if process_group is not None:
        dist.all_reduce(t, group=process_group)
    return t


def _flat_grad(loss, params, retain_graph):
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])


def _check_step_args(losses, params, normalize, update):
    if normalize not in ("none", "l2", "loss", "loss+"):
        raise ValueError(f"unknown normalize {normalize!r}; use 'none', 'l2', 'loss' or 'loss+'")
    if update not in ("scaled", "raw", "normalized"):
        raise ValueError(f"unknown update {update!r}; use 'scaled', 'raw' or 'normalized'")
    losses = list(losses)
    if not losses:
        raise ValueError("no losses; pass at least one present group's loss")
    for i, L in enumerate(losses):
        if L.numel() != 1 or not L.requires_grad:
            raise ValueError(f"losses[{i}] must be a scalar that requires grad (got shape "
                             f"{tuple(L.shape)}, requires_grad={L.requires_grad})")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad; pass the model's parameters")
    if any(p.device != params[0].device for p in params):
        raise ValueError("params live on several devices; pass params on one device")
    return losses, params


def group_gradients(losses, params, *, retain_graph=False, process_group=None, out=None):
    """g_i = dL_i/dparams for each loss, as the rows of one [G, P] matrix (params flattened in
    order; frozen or unused parameters give zeros), summed over process_group in ONE collective.
    The graph is kept for all but the last loss, and for that one too when retain_graph.

    out: a [G', P] buffer with G' >= G, of the params' dtype and device, to write the rows into
    (its first G rows are returned). A caller that keeps one across steps (see mgda_backward's
    `workspace`) spares the allocator a [G, P] matrix per step: on the CPU, glibc hands large
    freed blocks back to the kernel and every new one costs page faults.

    A part of mgda_backward, for a custom step; most users call mgda_backward."""
    G, P = len(losses), sum(p.numel() for p in params)
    if out is None or out.shape[0] < G or out.shape[1] != P or out.dtype != params[0].dtype \
            or out.device != params[0].device:
        out = torch.empty(G, P, dtype=params[0].dtype, device=params[0].device)
    flat = out[:G]
    for i, L in enumerate(losses):
        grads = torch.autograd.grad(L, params, retain_graph=retain_graph or i < G - 1, allow_unused=True)
        o = 0
        for g, p in zip(grads, params):
            row = flat[i, o:o + p.numel()]
            row.zero_() if g is None else row.copy_(g.reshape(-1))
            o += p.numel()
        del grads
    return _all_reduce(flat, process_group)


def _gram(flat, columns):
    """flat[:, columns] @ flat[:, columns].T in float64, block by block: no TF32, no [G, P]
    float64 copy."""
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for start, stop in columns:
        s = flat[:, start:stop].to(torch.float64)
        gram += s @ s.T
    return gram


def _columns(params, subset):
    """(start, stop) slices of flattened `params` that hold the parameters in `subset`."""
    offsets = np.cumsum([0] + [p.numel() for p in params]).tolist()
    where = {id(p): k for k, p in enumerate(params)}
    blocks = [where.get(id(p)) for p in subset if p.requires_grad]
    if any(k is None for k in blocks):
        raise ValueError("gram_params must be a subset of params (that require grad); pass e.g. "
                         "the backbone's parameters")
    return [(offsets[k], offsets[k + 1]) for k in dict.fromkeys(blocks)]


def _norms(normalize, gram_diag, loss_values):
    """n_i of Sener & Koltun's gradient normalisations; a zero or invalid n_i falls back to 1."""
    if normalize == "none":
        n = np.ones_like(loss_values)
    elif normalize == "l2":
        n = np.sqrt(np.clip(gram_diag, 0, None))
    elif normalize == "loss":
        n = loss_values.copy()
    else:
        n = loss_values * np.sqrt(np.clip(gram_diag, 0, None))
    return np.where(np.isfinite(n) & (n > 0), n, 1.0)


def mgda_weights(gram, loss_values, *, normalize="l2", update="scaled"):
    """From the Gram [G, G] of the raw gradients (and the losses, for "loss" / "loss+"):
    n_i, alpha = the min-norm weights of g_i / n_i (Eq. 11), and the weights w_i of the raw g_i
    in the update (see the rules above). Returns (alpha, w, normalised Gram): float64 CPU tensors.

    The Gram and the losses reach the host in ONE copy: on a GPU the only synchronisation of an
    MGDA step (the solver runs on the host, on G x G numbers).

    A part of mgda_backward, for a custom step; most users call mgda_backward."""
    G = gram.shape[0]
    host = torch.cat([gram.detach().to(torch.float64),
                      loss_values.detach().to(gram.device, torch.float64).reshape(G, 1)], 1).cpu().numpy()
    M, values = host[:, :G], host[:, G]
    n = _norms(normalize, np.diag(M), values)
    M_n = M / np.outer(n, n)
    if G > 1 and (np.diag(M_n) == 0).any():
        warnings.warn("a group has a zero gradient, so the min-norm direction is zero and this "
                      "step does nothing; pass only present groups (losses[present])")
    alpha = _min_norm(M_n)
    if update == "raw":
        w = alpha
    elif update == "normalized":
        w = alpha / n
    else:
        w = (alpha / n) / max((alpha / n).sum(), 1e-300)  # alpha = 0 everywhere cannot happen
    return torch.from_numpy(alpha), torch.from_numpy(w), torch.from_numpy(M_n)


def _loss_values(losses, device, normalize, process_group):
    values = torch.stack([L.detach().reshape(()) for L in losses]).to(device, torch.float64)
    if normalize in ("loss", "loss+"):  # the global batch's losses: the sum of the local ones
        _all_reduce(values, process_group)
    return values


def _accumulate(params, flat):
    """p.grad += the matching slice of flat, as .backward() would (creating p.grad if None, in the
    parameter's layout: a channels_last weight gets a channels_last grad, as autograd gives it; a
    contiguous grad would push the optimiser's foreach kernels onto their slow path)."""
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        g = g.view(p.shape)
        if p.grad is None:
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g.detach())
        else:
            p.grad.add_(g.to(p.grad.dtype))


def weighted_backward(losses, weights, params, *, retain_graph=False, process_group=None):
    """p.grad += d(sum_i weights_i L_i)/dp for every p in params (that requires grad), summed over
    process_group: one backward pass. weights: numbers, or a tensor [G] (then nothing is read on
    the host). Serves the plain and averaged steps, the cheap MGDA modes' update, and any extra
    loss (e.g. a contrastive term) added after an MGDA step. For GBG's step itself, most users
    call mgda_backward."""
    losses = list(losses)
    params = [p for p in params if p.requires_grad]
    if torch.is_tensor(weights):
        stacked = torch.stack([L.reshape(()) for L in losses])
        total = (to_device(weights, stacked.device).to(stacked.dtype) * stacked).sum()
    else:
        total = sum(float(w) * L.reshape(()) for w, L in zip(weights, losses))
    _accumulate(params, _all_reduce(_flat_grad(total, params, retain_graph), process_group))


def mgda_backward(losses, params, *, gram_params=None, normalize="l2", update="scaled",
                  retain_graph=False, process_group=None, workspace=None):
    """THE GBG step (Alg. 2, Eq. 10-12): p.grad += d = sum_i w_i g_i. Call it between
    optimizer.zero_grad() and optimizer.step(), on losses[present] from group_losses.

    losses: G scalar tensors, one per PRESENT group. One backward per group gives the rows g_i
    over params; their Gram over gram_params (default: params; e.g. the backbone only, as the
    release) gives alpha and w (mgda_weights); d is formed from the stored rows, so the update
    costs no extra backward. Frozen parameters are skipped.

    process_group: the group to sum over when the batch is split over processes (the losses
    normalised with the global class counts, group_losses(class_counts=...)): the [G, P]
    gradients and the loss values are summed in one collective each, and every process adds the
    d of the global batch. None (the default) communicates nothing: a caller under DDP, or on one
    process, gets no hidden reduction.

    workspace: a dict the caller keeps across steps; the [G, P] gradient matrix lives in it
    instead of being allocated every step (see group_gradients).

    Returns {"alpha", "weights" (w), "gram" (of the normalised g_i / n_i: step_diagnostic's input)}.
    """
    losses, params = _check_step_args(losses, params, normalize, update)
    columns = _columns(params, params if gram_params is None else gram_params)
    values = _loss_values(losses, params[0].device, normalize, process_group)
    kept = None if workspace is None else workspace.get("flat")
    flat = group_gradients(losses, params, retain_graph=retain_graph, process_group=process_group,
                           out=kept)
    if workspace is not None and (kept is None or flat.data_ptr() != kept.data_ptr()):
        workspace["flat"] = flat  # a new buffer; a kept one stays whole (flat may be its first rows)
    alpha, w, gram = mgda_weights(_gram(flat, columns), values, normalize=normalize, update=update)
    _accumulate(params, to_device(w, flat.device).to(flat.dtype) @ flat)
    return {"alpha": alpha, "weights": w, "gram": gram}


# =================================================================================================
# Extras: none of what follows is needed to train with GBG. Sketched class gradients (large K x P),
# choosing G automatically, baseline groupings and comparing groupings (the NCut value, the
# adjusted Rand index), the cheaper last-stage and MGDA-UB steps, and diagnostics of a step.
# =================================================================================================

# --- Extras: sketched class gradients (class_gradients(sketch_dim=m)) -----------------------------
#
# Sketch mode (`sketch_dim=m`): every batch's flattened gradient g is compressed to
# (S g)_b = sum_{i: h(i)=b} s_i g_i with a seeded CountSketch (h, s); S is linear, so the sum of
# the sketches is the sketch of the sum and the K x P matrix is never built (memory O(K*m + P)).
# For unit vectors a, b, <Sa, Sb> is unbiased for <a, b> with
#     Var = (1 + <a,b>^2 - 2 sum_i a_i^2 b_i^2) / m <= 2/m,
# and the sketched norms obey the same bound, so each cosine of the sketches is off by
# O(sqrt(2/m)). tests/test_grouping.py checks, for fixed seeds, m = 2048 and 8192, that the
# largest error over all class pairs is <= 3 * sqrt(2/m) and the mean error <= sqrt(2/m).

def _count_sketch_hashes(num_params, sketch_dim, seed):
    """CountSketch bucket h: [P] -> [m] and sign s: [P] -> +-1. Drawn on the CPU from a seeded
    generator, so every process (whatever its device) sketches with the same map."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, sketch_dim, (num_params,), generator=gen)
    s = torch.randint(0, 2, (num_params,), generator=gen, dtype=torch.int8) * 2 - 1
    return h, s


# --- Extras: choosing G automatically (beyond the paper) ------------------------------------------

# Above this many classes the top eigenvalues come from Lanczos (scipy eigsh, O(K^2) a matvec)
# instead of a dense solver (O(K^3)): measured on one core, they take about as long at K = 2,000
# and Lanczos is faster above.
_DENSE_MAX = 1000


def _top_eigenvalues(W, n):
    """The n largest eigenvalues of M = D^-1/2 W D^-1/2 (D = diag of W's row sums), decreasing.
    Overwrites W with M to spare a K x K copy."""
    K = W.shape[0]
    s = 1.0 / np.sqrt(np.maximum(W.sum(1), 1e-12))
    W *= s[:, None]
    W *= s[None, :]
    if K <= _DENSE_MAX:
        return scipy.linalg.eigh(W, eigvals_only=True, subset_by_index=[K - n, K - 1])[::-1]
    # a fixed start (the same result on every call); Ritz values to 1e-8 relative accuracy, far
    # below the gaps compared (measured at K = 3,000: within 1e-15 of the dense values, and
    # 1.7-2.8x faster than to machine precision with the default subspace)
    v0 = np.random.default_rng(0).standard_normal(K)
    return np.sort(scipy.sparse.linalg.eigsh(W, k=n, which="LA", v0=v0, ncv=min(K, max(2 * n + 1, 40)), tol=1e-8,
                                             return_eigenvectors=False))[::-1]


def _eigengaps(W, max_groups):
    """gaps[G - 2] = l_G - l_{G+1} for G = 2 .. max_groups (l_1 = 1 is the trivial eigenvalue),
    with the eigenvalues l. Gaps below rounding (64 K eps; |M| <= 1) count as 0, so that an
    affinity without any spread (every gap 0) cannot beat its null by rounding alone."""
    l = _top_eigenvalues(W, max_groups + 1)
    gaps = l[1:max_groups] - l[2:]
    return np.where(gaps > 64 * W.shape[0] * np.finfo(float).eps, gaps, 0.0), l


def choose_num_groups(affinity, max_groups, *, fallback=4, num_permutations=19, alpha=0.05, seed=0):
    """The number of groups G that the spectrum of the affinity graph supports, for ncut_groups.

    The spectrum is that of M = D^-1/2 W D^-1/2 on W = affinity + 1 (zero diagonal), the matrix whose leading
    eigenvectors ncut_groups clusters; l_1 = 1 >= l_2 >= ... are its eigenvalues and
    gap_G = l_G - l_{G+1} (G = 2 .. max_groups) its eigengaps. G blocks of classes give G - 1
    eigenvalues above the rest, hence a gap at G (von Luxburg 2007, "A tutorial on spectral
    clustering", Sec. 8.3).

    Criterion: the LARGEST G whose gap is significant, not the G of the largest gap (the
    eigengap heuristic, returned as `eigengap_choice`). A block's eigenvalue grows with its size,
    so between blocks of unequal sizes the gaps among the block eigenvalues (e.g. l_2 - l_3
    between a large and a mid-sized block) can exceed the gap that ends the last block, and the
    heuristic then stops early: on the 52 planted structures of tests/test_num_groups.py (2 to 6
    blocks, sizes up to 4:1) it was right 28 times, mostly answering 2 where there were more,
    and this criterion 52 times. A gap
    is significant when no structureless affinity with the same values gives as large a gap:
    the null is the same affinity with its off-diagonal entries permuted at random (keeping
    symmetry and the diagonal), which keeps their distribution and destroys any block pattern.
    Each permutation's LARGEST gap forms the null distribution, so every gap is tested against
    the maximum over G (the max-statistic adjustment of Westfall & Young): the chance that a
    structureless affinity shows any significant gap is at most alpha.
    p_G = (1 + #{null maxima >= gap_G}) / (1 + num_permutations), significant when p_G <= alpha.

    structured (p_value = min_G p_G <= alpha): num_groups is the largest significant G.
    Otherwise num_groups = fallback (default 4: the paper's choice, Fig. 4) and fallback_used.

    What the null assumes: exchangeable off-diagonal affinities. Cosines of vectors that span
    few dimensions (K comparable to their dimension) are not: their random low-rank geometry
    reads as structure (measured: cosines of 100 Gaussian vectors in 200 dimensions came out
    structured 13 times in 20; i.i.d. affinities, about alpha of the time as they should).

    Cost: 1 + num_permutations eigenproblems (the top max_groups + 1 eigenvalues of a dense
    K x K matrix: LAPACK up to K = 1000, Lanczos above) and num_permutations shuffles of the
    K (K - 1) / 2 affinities. Measured on one CPU thread (tests/bench_gbg.py part h): 1.8 s at
    K = 1,000, 384 s at K = 8,142 (iNaturalist), with 1.9 GB of memory at the peak.
    num_permutations = 19 is the fewest with which a test at 5 % can reject (p = 1/20).

    Returns a dict of JSON-ready values: num_groups, structured, p_value, eigenvalues (the top
    max_groups + 1), gaps (for G = 2 .. max_groups), gap_p_values, null_max_gaps (each
    permutation's largest gap), null_gap_quantile (the value a gap must exceed: the upper
    alpha point of null_max_gaps in the permutation test's sense), eigengap_choice,
    fallback_used, and the settings (max_groups, fallback, num_permutations, alpha, seed).
    """
    W = _graph_weights(affinity)
    K = len(W)
    if not 2 <= max_groups <= K - 1:
        raise ValueError(f"max_groups={max_groups} must be between 2 and K - 1 = {K - 1} (the gap at G needs "
                         f"l_(G+1)); K={K} classes")
    if not 1 <= fallback <= K:
        raise ValueError(f"fallback={fallback} must be between 1 and the number of classes K={K}")
    if not 0 < alpha < 1 or (num_permutations + 1) * alpha < 1:
        raise ValueError(f"alpha={alpha} with num_permutations={num_permutations}: the smallest p-value is "
                         f"1 / (num_permutations + 1), so alpha must be in (0, 1) and num_permutations >= "
                         f"{math.ceil(1 / alpha) - 1 if 0 < alpha < 1 else 1}")
    rng = np.random.default_rng(seed)
    upper = np.triu_indices(K, 1)
    values, diagonal = W[upper], np.diag(W).copy()
    gaps, eigenvalues = _eigengaps(W.copy(), max_groups)
    null = np.empty(num_permutations)
    for r in range(num_permutations):
        W[upper] = values[rng.permutation(values.size)]
        W.T[upper] = W[upper]
        np.fill_diagonal(W, diagonal)
        null[r] = _eigengaps(W, max_groups)[0].max()
    # p_G <= alpha  <=>  at most `allowed` null maxima reach gap_G  <=>  gap_G > the threshold
    allowed = int(math.floor(alpha * (num_permutations + 1) + 1e-9)) - 1
    threshold = float(np.sort(null)[::-1][allowed])
    gap_p = (1 + (null[None, :] >= gaps[:, None]).sum(1)) / (1 + num_permutations)
    significant = np.flatnonzero(gap_p <= alpha)
    structured = significant.size > 0
    return {"num_groups": int(2 + significant.max()) if structured else int(fallback),
            "structured": bool(structured), "p_value": float(gap_p.min()),
            "eigenvalues": eigenvalues.tolist(), "gaps": gaps.tolist(), "gap_p_values": gap_p.tolist(),
            "null_max_gaps": null.tolist(), "null_gap_quantile": threshold,
            "eigengap_choice": int(2 + np.argmax(gaps)), "fallback_used": not structured,
            "max_groups": int(max_groups), "fallback": int(fallback), "num_permutations": int(num_permutations),
            "alpha": float(alpha), "seed": int(seed)}


# --- Extras: baseline groupings and comparing groupings (Table 5, the NCut value, Rand index) -----

def random_groups(num_classes, num_groups, *, seed=0):
    """Seeded random partition into G non-empty groups of near-equal size (Table 5 baseline)."""
    _check_num_groups(num_groups, num_classes)
    perm = np.random.default_rng(seed).permutation(num_classes)
    groups = np.empty(num_classes, dtype=np.int64)
    groups[perm] = np.arange(num_classes) % num_groups
    return _canonical(groups)


LI2020_EDGES = (10, 100, 1000)  # Li et al. 2020 (BAGS), Sec. 3.2: [0, 10), [10, 100), [100, 1000), [1000, inf)


def count_bins_groups(class_counts, edges=LI2020_EDGES):
    """Instance-number grouping as the paper's Table 5 cites it (Li et al. 2020, "Balanced Group
    Softmax"): a class goes to the bin of its training count, [0, 10), [10, 100), [100, 1000),
    [1000, inf) by default; empty bins are dropped, group 0 = the most frequent bin. The number of
    groups is the number of non-empty bins: 4 on ImageNet-LT (counts 5 ... 1280), 3 on
    CIFAR-10-LT IF 100 (50 ... 5000). count_groups keeps any G."""
    counts = _numpy(class_counts)
    bins = np.searchsorted(np.asarray(edges, dtype=float), counts, side="right")  # 0 = [0, edges[0])
    used = np.unique(bins)[::-1]  # the most frequent bin first
    return np.searchsorted(-used, -bins).astype(np.int64)


def count_groups(class_counts, num_groups):
    """Instance-number grouping into any G (ours; Li et al.'s bins are count_bins_groups): classes
    sorted by training count, most frequent first (stable), cut into G contiguous near-equal
    groups; group 0 = head."""
    counts = _numpy(class_counts)
    _check_num_groups(num_groups, counts.size)
    groups = np.empty(counts.size, dtype=np.int64)
    for g, chunk in enumerate(np.array_split(np.argsort(-counts, kind="stable"), num_groups)):
        groups[chunk] = g
    return groups


def ncut_value(affinity, groups):
    """Normalised-cut objective, by which the paper solves Eq. 9, on W = affinity + 1 (no self-loops, _graph_weights): sum over groups V of
    cut(V, rest) / assoc(V, all). Lower is better; 0 means no weight between groups."""
    W = _graph_weights(affinity)
    groups = _numpy(groups)
    total = 0.0
    for g in np.unique(groups):
        inside = groups == g
        assoc = W[inside].sum()
        total += W[inside][:, ~inside].sum() / assoc if assoc > 0 else 0.0
    return float(total)


def adjusted_rand_index(a, b):
    """Adjusted Rand index (Hubert & Arabie 1985) of two partitions of the same classes, given as
    label arrays: 1 when they are the same partition (whatever the labels), 0 on average for
    independent partitions with these group sizes, negative below that. Two partitions that are
    both all-singletons or both one group are the same partition: 1."""
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"the two labellings must cover the same classes, got {a.size} and {b.size} labels")
    if a.size < 2:
        return 1.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia.reshape(-1), ib.reshape(-1)), 1.0)
    pairs = lambda n: float((n * (n - 1) / 2).sum())
    index, sum_a, sum_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = sum_a * sum_b / pairs(np.array([a.size]))
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


# --- Extras: the last-stage step (mgda_backward_partial) ------------------------------------------

def mgda_backward_partial(losses, params, gram_params, *, normalize="l2", update="scaled",
                          retain_graph=False, process_group=None):
    """The cheaper step: the G backward passes stop at gram_params (a trailing part of the shared
    network, e.g. its last stage), the Gram there gives alpha and w (as mgda_backward with the same
    gram_params would), then ONE full backward of sum_i w_i L_i adds d to p.grad over params.
    G partial backwards + 1 full instead of G full ones; alpha is exact for the Gram it sees,
    which is the trailing part's, not the whole network's. Same arguments and result as
    mgda_backward, which most users call."""
    losses, params = _check_step_args(losses, params, normalize, update)
    gram_params = [p for p in gram_params if p.requires_grad]
    _columns(params, gram_params)  # checks that gram_params is a subset of params
    values = _loss_values(losses, params[0].device, normalize, process_group)
    flat = group_gradients(losses, gram_params, retain_graph=True, process_group=process_group)
    alpha, w, gram = mgda_weights(_gram(flat, [(0, flat.shape[1])]), values, normalize=normalize,
                                  update=update)
    weighted_backward(losses, w, params, retain_graph=retain_graph, process_group=process_group)
    return {"alpha": alpha, "weights": w, "gram": gram}


# --- Extras: the shared-representation step (mgda_backward_features; MGDA-UB) ---------------------
#
# Sener & Koltun (2018), Sec. 3.3 "MGDA-UB": when every objective reaches the shared weights
# through one representation z = f(x; theta_sh), g_i(theta_sh) = J^T g_i(z) with J = dz/dtheta_sh,
# so |sum_i a_i g_i(theta_sh)| <= ||J|| |sum_i a_i g_i(z)| for every a (their Theorem 1), and the
# min-norm problem is solved over the cheap z-gradients: G backwards that stop at z, then one full.
# In GBG the objectives do NOT share samples: group i's loss reads only its own rows of z, so
# g_i(z) is zero outside group i's rows, the z-Gram is DIAGONAL and its min-norm point ignores how
# the groups' gradients interact (alpha_i ~ 1/|g_i(z)|^2; under "l2" all alpha_i = 1/G). What the
# groups share besides the backbone is the classifier, which reaches the loss beside z, not
# through it. So the Gram here is over the concatenation [g_i(z), g_i(classifier)]
# (gram_params: the classifier's parameters), the Gram of the exact step whose backbone part
# J^T g_i(z) is replaced by g_i(z). For every a on the simplex, with g_i(theta) the exact step's
# gradient over backbone + classifier,
#     |sum_i a_i g_i(theta)|^2 = |J^T sum_i a_i g_i(z)|^2 + |sum_i a_i g_i(fc)|^2
#                              <= max(||J||^2, 1) |sum_i a_i [g_i(z), g_i(fc)]|^2,
# so the exact min-norm value is at most max(||J||^2, 1) times this step's (the bound
# tests/test_moo.py checks). With z = theta (the representation is the parameter) the two steps
# are the same.

def mgda_backward_features(losses, features, params, *, gram_params=(), normalize="l2",
                           update="scaled", retain_graph=False, process_group=None):
    """MGDA-UB over the shared representation: alpha from the Gram of dL_i/d(features) joined by
    dL_i/d(gram_params), then ONE backward of sum_i w_i L_i adds d to p.grad over params.

    losses: G scalar tensors, one per PRESENT group, that reach the shared network only through
    `features` (z, e.g. the backbone's output [B, d]: what the classifier reads). gram_params:
    parameters the losses reach beside z (the classifier's, shared by every group): their
    gradients join the Gram (see above why GBG needs them: without, the Gram is diagonal). Each
    group's gradients come from one autograd call over [z] + gram_params that stops at z.
    Normalisers and update rules as mgda_backward's, over this Gram.

    process_group: the batch split over processes. Every process holds its own rows of z, so the
    z part of the Gram is the SUM of the processes' Grams; the classifier's gradients are summed
    first, then their Gram is taken. Both travel in one collective. Returns as mgda_backward."""
    losses, params = _check_step_args(losses, params, normalize, update)
    if not torch.is_tensor(features) or not features.requires_grad:
        raise ValueError("features must be the tensor the losses read the shared network through (z, the "
                         "backbone's output, in the graph: requires grad); got "
                         f"{type(features).__name__}")
    gram_params = [p for p in gram_params if p.requires_grad]
    values = _loss_values(losses, params[0].device, normalize, process_group)
    G, P = len(losses), sum(p.numel() for p in gram_params)
    gz = torch.empty(G, features.numel(), dtype=features.dtype, device=features.device)
    shared = torch.zeros(G * G + G * P, dtype=torch.float64, device=features.device)
    rows = shared[G * G:].view(G, P)
    for i, L in enumerate(losses):  # one call per group, stopping at z: no backbone backward here
        g_z, *g_p = torch.autograd.grad(L, [features] + gram_params, retain_graph=True, allow_unused=True)
        if g_z is None:  # else the Gram would be the classifier's alone, silently
            raise ValueError(f"loss {i} does not read `features`: pass the tensor the classifier was applied to "
                             f"(z = backbone(x) itself, not a copy or a slice taken after the forward)")
        gz[i].copy_(g_z.reshape(-1))
        if P:
            rows[i] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                 for g, p in zip(g_p, gram_params)])
    shared[:G * G] = _gram(gz, [(0, gz.shape[1])]).reshape(-1)
    _all_reduce(shared, process_group)  # sum of the z-Grams; sum of the classifier's gradients
    gram = shared[:G * G].view(G, G) + rows @ rows.T
    alpha, w, gram = mgda_weights(gram, values, normalize=normalize, update=update)
    weighted_backward(losses, w, params, retain_graph=retain_graph, process_group=process_group)
    return {"alpha": alpha, "weights": w, "gram": gram}


# --- Extras: diagnostics (the Pareto descent property; Fig. 2, Eq. 3) -----------------------------

def pareto_cosines(gram, alpha):
    """cos(d, g_i) for every group and |d|, d = sum_i alpha_i g_i, from the Gram [G, G] and alpha
    (tensors, float64 on the Gram's device). All cosines are >= 0 at the min-norm point."""
    Ma = gram @ alpha
    d_norm = (alpha @ Ma).clamp(min=0).sqrt()
    denom = d_norm * gram.diagonal().clamp(min=0).sqrt()
    return torch.where(denom > 0, Ma / denom.clamp(min=1e-300), torch.zeros_like(Ma)), d_norm


def step_diagnostic(gram, alpha, losses):
    """What one MGDA step did, from the Gram only: alpha, each group's loss, cos(d, g_i) for every
    group (all >= 0 at the min-norm point: the Pareto descent property) and ||d||. Pass the "gram"
    and "alpha" that mgda_backward returns (those of the normalised g_i / n_i): the cosines do not
    depend on n_i > 0 nor on a positive rescaling of d; d_norm is that of the min-norm point
    sum_i alpha_i g_i / n_i over the Gram's parameters."""
    gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
    alpha = torch.as_tensor(alpha).detach().to("cpu", torch.float64)
    cos, d_norm = pareto_cosines(gram, alpha)
    return {
        "alpha": alpha.tolist(),
        "losses": [float(torch.as_tensor(L).detach()) for L in losses],
        "cos": cos.tolist(),
        "d_norm": float(d_norm),
    }


def class_update_cosines(logits, targets, update, params, *, class_counts=None, process_group=None):
    """The paper's measure of gradient imbalance (Fig. 2; its appendix figure for CE against
    CE+GBG): for every class k in a batch, the cosine between the class's gradient in that batch,
    g_k = grad of (sum of the cross-entropy of the batch's class-k samples / their number), and the
    update direction d the step takes (the batch gradient under CE, sum_i w_i g_i under MGDA).
    A larger cosine means class k contributes more to the descent. Also |g_k| / |d|, the relative
    size (the figure's dots).

    logits [B, K] must still hold their graph (one backward per class present; the last one frees
    it, so call this after the step's own backward or on a fresh forward);
    update: the flat d [P] over `params`, in their order. class_counts [K]: the global batch's
    counts when the batch is split over processes (the class gradients are then summed over them);
    default, this batch's. Returns float64 CPU tensors cos [K] and ratio [K], NaN for the classes
    that have no sample in the batch."""
    K = logits.shape[1]
    counts = count_labels(targets, K) if class_counts is None else torch.as_tensor(class_counts)
    counts = counts.to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast -> float32
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    class_loss = torch.zeros(K, dtype=per_sample.dtype, device=logits.device).index_add(0, targets, per_sample)
    class_loss = class_loss / counts.clamp(min=1).to(per_sample.dtype)
    update = update.detach().reshape(-1).to(torch.float64)
    d_norm = update.norm()
    cos = torch.full((K,), float("nan"), dtype=torch.float64)
    ratio = torch.full((K,), float("nan"), dtype=torch.float64)
    present = torch.nonzero(counts.cpu() > 0).flatten().tolist()  # the same on every process
    for n, k in enumerate(present):
        g = _all_reduce(_flat_grad(class_loss[k], params, retain_graph=n + 1 < len(present)), process_group)
        g = g.to(torch.float64)
        g_norm = g.norm()
        cos[k] = (g @ update / (g_norm * d_norm).clamp(min=1e-300)).item()
        ratio[k] = (g_norm / d_norm.clamp(min=1e-300)).item()
    return cos, ratio
