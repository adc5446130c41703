"""Speed and memory benchmark of gbg.py. Not a test (pytest does not collect
bench_*): it prints ratios measured within ONE run and asserts nothing about time.

    python tests/bench_gbg.py                   # the full run (~10 min on a 2-core CPU)
    python tests/bench_gbg.py --quick           # smaller sizes: a smoke run of every part
    python tests/bench_gbg.py --only b,c --device cuda

(a) gbg.class_gradients vs one CE training epoch over the same samples (ResNet-32, a
    CIFAR-100-LT-sized set of random images), and vs the authors' scheme (one backward per class
    present in each mixed batch, every class gradient copied to the CPU), written out below.
(b) an exact G = 4 MGDA step, the last-stage step (--moo-grad last), the weight-reusing step
    (--moo-every k) and the MGDA-UB step (--moo-grad features) vs a plain CE step.
(c) gbg.min_norm_weights for G = 2 ... 1000.
(i) (b)'s steps, MGDA-UB (--moo-grad features) among them, at ResNet-50 on ImageNet-shaped batches
    (3x224x224, K = 1000, batch 16: what one shared CPU thread takes in minutes).
(d) peak memory of class_gradients at iNaturalist scale (8,142 classes, ResNet-50 backbone,
    CountSketch 16384), measured in a fresh subprocess, beside the dense K x P matrix.
(e) BCL's three views of a CIFAR-sized epoch: torchvision per sample (DataLoader workers) vs
    data_lt.device_views batched on the device.
(f) --amp: images/s of a CE epoch and of exact MGDA steps (ResNet-32, batch 256), fp32 vs bf16
    autocast + channels_last; on CUDA these are the numbers to size a GPU run with.
(g) torch.compile against eager for a CE step and an exact MGDA step, and the compile time.
(h) gbg.choose_num_groups (--num-groups auto: 1 + 19 eigenproblems of the K x K affinity graph)
    for K = 100 ... 8,142 (iNaturalist), on planted blocks, and its peak memory.
Ends with a markdown table (what, measured, target) for the README. The targets are the
project's, set with a GPU in mind; on a CPU the ratios are what to read.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# numpy's BLAS (the LU solves inside min_norm_weights) ignores torch.set_num_threads; on shared
# cores its spinning threads made a 1000 x 1000 solve 4-8x slower and erratic, so it gets one
# thread too unless the caller set one. Must happen before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_lt  # noqa: E402
import gbg  # noqa: E402
import train  # noqa: E402

GB = 1e9  # decimal gigabytes throughout


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(flags, what, env=None):
    """Run this script again with `flags` in a fresh process; print what it printed and return
    the JSON object on its last line (None, after printing its stderr, when it failed)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        print(f"    {what}: the subprocess failed:\n{proc.stderr[-2000:]}")
        return None
    lines = proc.stdout.strip().splitlines()
    if len(lines) > 1:
        print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def timed(fn, device):
    """(seconds, wall seconds, result) of fn(). On the CPU the seconds are this process's CPU
    time: a neighbour's job on a shared core stretches wall time (seen here: one step 2.5 s to
    5.5 s) far more than CPU time, and with one thread nothing of ours spins. On CUDA both are
    wall time, with the queue drained before and after."""
    sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    wall = time.perf_counter() - w0
    return (wall if device.type == "cuda" else time.process_time() - c0), wall, out


class RandomImages(torch.utils.data.Dataset):
    """Seeded N(0, 1) images with given labels. lazy=True draws image i from seed i when asked, so
    the set costs no memory (used for the memory measurement)."""

    def __init__(self, targets, size=32, seed=0, lazy=False):
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.size, self.seed = size, seed
        self.images = None if lazy else torch.randn(len(self.targets), 3, size, size,
                                                   generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], int(self.targets[i])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.randn(3, self.size, self.size, generator=gen), int(self.targets[i])


def lt_dataset(num_classes, n_max, seed=0):
    counts = data_lt.lt_counts(n_max, num_classes, 100)  # n_k = int(n_max * 0.01 ** (k / (K-1)))
    return RandomImages(np.repeat(np.arange(num_classes), counts), seed=seed), counts


# --- (a) class gradients vs a CE epoch vs the authors' scheme --------------------------------

def ce_epoch(model, loader, optimizer, device):
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def authors_class_gradients(model, loader, num_classes, params, device, max_batches):
    """REFERENCE SCHEME (the authors' way, timed here only; gbg.py does not use it): run the usual
    mixed batches; in each, one backward PER CLASS present (retaining the graph), each class's
    gradient flattened, copied to the CPU and accumulated there. Every backward walks the whole
    batch's graph, so a batch costs (number of classes in it) backwards instead of one.

    Stops after max_batches batches (a full epoch is ~40x a CE epoch) and returns the time of the
    forwards and of the per-class backwards, and how many (batch, class) pairs those covered."""
    model.eval()  # as gbg.class_gradients, so the two compute the same thing
    sums = torch.zeros(num_classes, sum(p.numel() for p in params))  # on the CPU
    t_fwd = t_bwd = 0.0
    pairs = 0
    for b, (x, y) in enumerate(loader):
        if b == max_batches:
            break
        x, y = x.to(device), y.to(device)
        dt, _, per_sample = timed(lambda: F.cross_entropy(model(x), y, reduction="none"), device)
        t_fwd += dt
        present = y.unique().tolist()

        def per_class_backwards():
            for j, k in enumerate(present):
                grads = torch.autograd.grad(per_sample[y == k].sum(), params,
                                            retain_graph=j < len(present) - 1)
                sums[k] += torch.cat([g.reshape(-1) for g in grads]).cpu()

        t_bwd += timed(per_class_backwards, device)[0]
        pairs += len(present)
    return t_fwd, t_bwd, pairs


def bench_class_gradients(args, device):
    K, n_max, arch = (20, 100, "resnet8") if args.quick else (100, 500, "resnet32")
    ds, counts = lt_dataset(K, n_max)
    bs = 256
    torch.manual_seed(0)
    model = train.build_model(arch, K).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # one fixed shuffled order, shared by the CE epoch and the reference scheme
    order = np.random.default_rng(0).permutation(len(ds))
    batches = [order[i:i + bs].tolist() for i in range(0, len(ds), bs)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches)
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    P = sum(p.numel() for p in backbone)
    print(f"(a) {arch}, K={K}, {len(ds):,} random 3x32x32 images (n_k = int({n_max} * 0.01^(k/{K - 1}))), "
          f"batch {bs}, {len(batches)} mixed batches; class gradients over the {P:,} backbone "
          f"parameters, exact rows (what train.py picks at this size)")

    x0, y0 = next(iter(loader))  # one untimed step: allocator and kernel warm-up
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x0.to(device)), y0.to(device)).backward()

    t_ce, w_ce, _ = timed(lambda: ce_epoch(model, loader, optimizer, device), device)
    print(f"    CE training epoch                : {t_ce:8.1f} s  (wall {w_ce:.1f} s)")
    t_cg, w_cg, grads = timed(lambda: gbg.class_gradients(model, ds, K, backbone, batch_size=bs, device=device,
                                                          recalibrate_bn=False), device)
    n_cg = sum(math.ceil(n / bs) for n in counts)
    print(f"    gbg.class_gradients              : {t_cg:8.1f} s  (wall {w_cg:.1f} s, {n_cg} one-class "
          f"batches) = {t_cg / t_ce:.2f}x the CE epoch (target <= 1.5x; wall ratio {w_cg / w_ce:.2f}x)")

    t_fwd, t_bwd, pairs = authors_class_gradients(model, loader, K, backbone, device, args.ref_batches)
    all_pairs = sum(len(set(ds.targets[b].tolist())) for b in batches)
    done = min(args.ref_batches, len(batches))
    t_ref = t_fwd / done * len(batches) + t_bwd / pairs * all_pairs
    print(f"    authors' scheme, timed on {done} of {len(batches)} batches ({pairs} of {all_pairs} "
          f"(batch, class) backwards):")
    print(f"      forward {t_fwd / done:.2f} s/batch, {t_bwd / pairs:.3f} s per class backward + "
          f"CPU copy -> whole epoch ESTIMATED {t_ref:.0f} s = {t_ref / t_ce:.1f}x the CE epoch "
          f"= {t_ref / t_cg:.1f}x gbg.class_gradients")
    assert torch.isfinite(grads).all()
    return {"cg_vs_ce": t_cg / t_ce, "ref_vs_ce": t_ref / t_ce, "ref_vs_cg": t_ref / t_cg,
            "setup": f"{arch}, K={K}, {len(ds):,} images"}


# --- (b) one training step: exact MGDA, last-stage MGDA, reused weights, plain CE -----------

# glibc's malloc hands large freed blocks back to the kernel (munmap) and maps fresh zeroed pages
# for the next one. The exact step frees and re-allocates the graph's gradient buffers four times
# per step, so on the CPU part of its cost is page faults, not arithmetic. train.py keeps freed
# memory in the process on the CPU (train.keep_freed_memory); (b) runs once as a plain library
# user would and once, in a child process, as train.py does.


def bench_steps(args, device, imagenet=False):
    """(b): ResNet-32 on CIFAR-shaped batches; (i) (imagenet): ResNet-50 on ImageNet-shaped ones
    (3x224x224, K = 1000), at the batch one CPU thread takes in minutes."""
    G = 4
    if imagenet:
        K, size = 1000, 224
        arch, bs, warmup, reps = ("resnet50", 8, 1, 2) if args.quick else ("resnet50", 16, 1, 3)
    else:
        K, size = 100, 32
        arch, bs, warmup, reps = ("resnet8", 64, 1, 2) if args.quick else ("resnet32", 256, 2, 5)
    torch.manual_seed(0)
    model = train.build_model(arch, K).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    if imagenet:  # labels spread over the classes, random images (the cost does not depend on them)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, 3, size, size, generator=g).to(device)
        y = torch.randperm(K, generator=g)[:bs].to(device)
    else:
        ds, _ = lt_dataset(K, 500)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:bs]
        x, y = ds.images[idx].to(device), ds.targets[idx].to(device)
    # random groups of 25 classes each: every group is present in a batch of this size
    class_to_group = torch.as_tensor(gbg.random_groups(K, G, seed=0)).to(device)
    assert bool(gbg.group_losses(model(x), y, class_to_group, G)[1].all()), "a group is missing"

    def ce():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    last = train.last_stage_params(model) + list(model.fc.parameters())
    workspace = {}  # as train.py: the [G, P] gradient matrix lives across steps

    def mgda(partial):  # train.py's defaults: normalize l2, update scaled, Gram over everything
        optimizer.zero_grad(set_to_none=True)
        losses, _ = gbg.group_losses(model(x), y, class_to_group, G, validate=False)  # GAC: all present
        if partial:
            gbg.mgda_backward_partial(list(losses), params, last)
        else:
            gbg.mgda_backward(list(losses), params, workspace=workspace)
        optimizer.step()

    fc = list(model.fc.parameters())

    def features():  # --moo-grad features: G backwards that stop at z (and fc), one full backward
        optimizer.zero_grad(set_to_none=True)
        z = model.forward_features(x)
        losses, _ = gbg.group_losses(model.fc(z), y, class_to_group, G, validate=False)
        gbg.mgda_backward_features(list(losses), z, params, gram_params=fc)
        optimizer.step()

    def reuse():  # --moo-every: a step between solves, one backward of sum_i w_i L_i
        optimizer.zero_grad(set_to_none=True)
        losses, _ = gbg.group_losses(model(x), y, class_to_group, G, validate=False)
        gbg.weighted_backward(list(losses), [0.25] * G, params)
        optimizer.step()

    def forward():  # for the floor: what one forward (graph kept, as in a CE step) costs
        F.cross_entropy(model(x), y)

    steps = {"CE": ce, "exact": lambda: mgda(False), "last": lambda: mgda(True), "reuse": reuse,
             "features": features, "forward": forward}
    times = {name: [] for name in steps}
    walls = {name: [] for name in steps}
    for r in range(warmup + reps):  # interleaved, so a burst of load hits every kind alike
        for name, fn in steps.items():
            dt, wall, _ = timed(fn, device)
            if r >= warmup:
                times[name].append(dt)
                walls[name].append(wall)
    med = {name: statistics.median(t) for name, t in times.items()}
    wmed = {name: statistics.median(t) for name, t in walls.items()}
    kept = getattr(args, "keep_memory", False)
    print(f"({'i' if imagenet else 'b'}{', as train.py on the CPU: malloc keeping freed memory' if kept else ''}) "
          f"{arch}, 3x{size}x{size}, K={K}, G={G} random groups, batch {bs}, SGD; median of {reps} steps after "
          f"{warmup} warm-up (interleaved)")
    for name, label in [("CE", "CE step        "), ("exact", "exact MGDA     "),
                        ("last", "last-stage MGDA"), ("reuse", "reused weights "),
                        ("features", "MGDA-UB (z+fc) ")]:
        ratio = "" if name == "CE" else f" = {med[name] / med['CE']:.2f}x CE (wall {wmed[name] / wmed['CE']:.2f}x)"
        print(f"    {label} : {med[name] * 1e3:8.1f} ms{ratio}; runs "
              f"{' '.join(f'{t:.2f}' for t in times[name])} s, wall {' '.join(f'{t:.2f}' for t in walls[name])} s")
    every = {k: (med["exact"] + (k - 1) * med["reuse"]) / k / med["CE"] for k in (2, 4, 8)}
    print("    --moo-every k (one exact solve, k - 1 reused-weight steps): "
          + ", ".join(f"k={k} {r:.2f}x CE" for k, r in every.items()))
    # floor of the exact step: one forward and G backwards, each backward costing what it costs
    # inside the CE step (CE step - forward; the optimizer step is in both)
    floor = (med["forward"] + G * (med["CE"] - med["forward"])) / med["CE"]
    print(f"    forward only  : {med['forward'] * 1e3:8.1f} ms, so a backward is {(med['CE'] - med['forward']) * 1e3:.1f} ms "
          f"and 1 forward + {G} backwards = {floor:.2f}x CE: the floor of the exact step on this device; "
          f"the exact step is {med['exact'] / med['CE'] / floor:.3f}x its floor (target <= 1.08x)")
    return {"exact_vs_ce": med["exact"] / med["CE"], "exact_vs_floor": med["exact"] / med["CE"] / floor,
            "last_vs_ce": med["last"] / med["CE"], "features_vs_ce": med["features"] / med["CE"],
            "reuse_vs_ce": med["reuse"] / med["CE"], "every": every, "floor": floor,
            "setup": f"{arch}, 3x{size}x{size}, batch {bs}"}


def bench_steps_kept_memory(args, imagenet=False):
    return run_child(["--steps-child", "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
                     + (["--imagenet"] if imagenet else []), f"({'i' if imagenet else 'b'}) as train.py runs on the CPU")


# --- (f) --amp: bf16 autocast and channels_last, against fp32 ------------------------------------

def amp_model(amp, device, num_classes=10):
    torch.manual_seed(0)
    model = train.build_model("resnet32", num_classes).to(device).train()
    return model.to(memory_format=torch.channels_last) if amp else model


def amp_forward(model, x, amp, device):
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(x).float()


def bench_amp(args, device):
    """One CE epoch over a CIFAR-10-LT-sized set (12,406 random 32x32 images, the IF 100 profile of
    5,000 ... 50) and exact G = 4 MGDA steps, ResNet-32, batch 256: images/s in fp32 and with
    --amp (bf16 autocast + channels_last), as train.py runs them."""
    ds, _ = lt_dataset(10, 500 if args.quick else 5000)
    bs, n_exact = 256, 2 if args.quick else 4
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    batches = [perm[i:i + bs].to(device) for i in range(0, len(ds), bs)]
    # the set held on the device, as train.py holds CIFAR: the model is measured, not the copies
    images, targets = ds.images.to(device), ds.targets.to(device)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3], device=device)
    out = {}
    print(f"(f) --amp: ResNet-32, batch {bs}; a CE epoch over {len(ds):,} images ({len(batches)} steps) and "
          f"{n_exact} exact G = 4 MGDA steps (train.py's defaults), fp32 vs bf16 autocast + channels_last")
    for amp in (False, True):
        model = amp_model(amp, device)
        params = [p for p in model.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        workspace = {}

        def ce_epoch_():
            for idx in batches:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(amp_forward(model, images[idx], amp, device), targets[idx]).backward()
                optimizer.step()

        def exact_steps():
            for idx in batches[:n_exact]:
                optimizer.zero_grad(set_to_none=True)
                losses, _ = gbg.group_losses(amp_forward(model, images[idx], amp, device), targets[idx], groups, 4,
                                             validate=False)
                gbg.mgda_backward(list(losses), params, workspace=workspace)
                optimizer.step()

        exact_steps()  # warm-up: allocator, kernels
        t_ce, w_ce, _ = timed(ce_epoch_, device)
        t_ex, w_ex, _ = timed(exact_steps, device)
        name = "bf16" if amp else "fp32"
        out[name] = {"ce": len(ds) / t_ce, "exact": n_exact * bs / t_ex}
        print(f"    {name}: CE epoch {t_ce:6.1f} s = {out[name]['ce']:6.0f} img/s (wall {w_ce:.1f} s); exact MGDA "
              f"{out[name]['exact']:6.0f} img/s")
    out["ce_ratio"] = out["bf16"]["ce"] / out["fp32"]["ce"]
    out["exact_ratio"] = out["bf16"]["exact"] / out["fp32"]["exact"]
    print(f"    --amp / fp32 images/s: CE {out['ce_ratio']:.2f}x, exact MGDA {out['exact_ratio']:.2f}x "
          f"(target for the CE epoch: >= 1.6x)")
    return out


# --- (g) torch.compile ----------------------------------------------------------------------------

def bench_compile(args, device):
    """A CE step and an exact G = 4 MGDA step of ResNet-32 (batch 256, fp32) with the model
    eager and under torch.compile (default mode), and what compiling cost. The MGDA step runs G
    backward passes through one forward (retain_graph), which compiled backward functions refuse
    unless torch._functorch.config.donated_buffer is off."""
    torch._functorch.config.donated_buffer = False
    bs, reps = (64, 2) if args.quick else (256, 3)
    x = torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    y = (torch.arange(bs) % 10).to(device)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3], device=device)
    model = amp_model(False, device)
    params = list(model.parameters())
    compiled = torch.compile(model)
    workspace = {}

    def ce(m):
        for p in params:
            p.grad = None
        F.cross_entropy(m(x), y).backward()

    def exact(m):
        for p in params:
            p.grad = None
        losses, _ = gbg.group_losses(m(x), y, groups, 4, validate=False)
        gbg.mgda_backward(list(losses), params, workspace=workspace)

    _, t_compile, _ = timed(lambda: (ce(compiled), exact(compiled)), device)
    res = {"compile_s": t_compile}
    for name, fn in (("ce", ce), ("exact", exact)):
        for label, m in (("eager", model), ("compiled", compiled)):
            fn(m)
            ts = [timed(lambda: fn(m), device)[0] for _ in range(reps)]
            res[f"{name}_{label}"] = statistics.median(ts)
    print(f"(g) torch.compile, ResNet-32, batch {bs}, fp32: compiling took {t_compile:.0f} s (wall)")
    for name in ("ce", "exact"):
        e, c = res[f"{name}_eager"], res[f"{name}_compiled"]
        print(f"    {name:5s} step: eager {e * 1e3:7.1f} ms, compiled {c * 1e3:7.1f} ms = {e / c:.2f}x faster")
    return res


# --- (c) the min-norm solver ----------------------------------------------------------------

def random_gram(G, kind, rng):
    """Gram of G random gradients of dim max(2G, 512). iid: independent N(0, I) rows, so the
    optimum uses every row (the solver's worst case). shared: a common direction plus noise
    (pairwise cosine ~0.5) with norms spread over one decade, as raw group gradients tend to be,
    so the optimum leans on the smaller ones."""
    D = max(2 * G, 512)
    g = rng.standard_normal((G, D))
    if kind == "shared":
        g = g / np.sqrt(D) + rng.standard_normal(D) / np.sqrt(D)
        g *= 10.0 ** rng.uniform(-0.5, 0.5, size=(G, 1))
    return torch.as_tensor(g @ g.T)


def bench_min_norm(args):
    Gs = [2, 4, 8, 16, 32, 100] if args.quick else [2, 4, 8, 16, 32, 100, 300, 1000]
    print("(c) gbg.min_norm_weights on the Gram of G random gradients of dim max(2G, 512); median "
          "time; KKT gap = (a'Ma - min_i (Ma)_i) / a'Ma, 0 at the optimum")
    print(f"    {'G':>5} {'iid':>10} {'gap':>8}   {'shared':>10} {'gap':>8} {'support':>8}")
    rng = np.random.default_rng(0)
    out = {}
    for G in Gs:
        row = []
        for kind in ("iid", "shared"):
            M = random_gram(G, kind, rng)
            ts = []
            while len(ts) < 3 or (sum(ts) < 1.0 and len(ts) < 50):
                dt, _, a = timed(lambda: gbg.min_norm_weights(M), torch.device("cpu"))
                ts.append(dt)
            Ma = M @ a
            obj = float(a @ Ma)
            row += [statistics.median(ts), max(obj - float(Ma.min()), 0.0) / obj, int((a > 0).sum())]
        out[G] = row
        print(f"    {G:>5} {row[0] * 1e3:8.2f}ms {row[1]:8.1e}   {row[3] * 1e3:8.2f}ms {row[4]:8.1e} "
              f"{row[5]:>8}")
    return out


# --- (h) choose_num_groups at up to iNaturalist's number of classes ---------------------------

def bench_num_groups(args):
    Ks = [100, 1000] if args.quick else [100, 1000, 3000, 8142]
    print("(h) gbg.choose_num_groups(A, 8): 19 permutations, 5 planted blocks (10-30 % of K) with noise; "
          "process CPU time (numpy/scipy, BLAS threads as set); peak memory growth of the process")
    out = {}
    for K in Ks:
        rng = np.random.default_rng(0)
        sizes = np.diff((K * np.array([0, 0.1, 0.25, 0.45, 0.7, 1.0])).astype(int))  # 10 % ... 30 % of K
        truth = rng.permutation(np.repeat(np.arange(5), sizes))
        A = np.where(truth[:, None] == truth[None], 0.6, 0.1) + 0.1 * rng.standard_normal((K, K))
        A = np.clip(np.triu(A, 1) + np.triu(A, 1).T, -1, 1)
        np.fill_diagonal(A, 1.0)
        before, how = start_peak_rss()
        t0 = time.process_time()
        choice = gbg.choose_num_groups(A, 8)
        dt = time.process_time() - t0
        grown = peak_rss(how) - before
        out[K] = {"s": dt, "G": choice["num_groups"], "peak_gb": grown / GB}
        print(f"    K={K:>5}: {dt:8.1f} s, chose G={choice['num_groups']} (planted 5), peak memory +{grown / GB:.2f} GB",
              flush=True)
        del A
    return out


# --- (d) peak memory of class_gradients at iNaturalist scale --------------------------------

def _status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def start_peak_rss():
    """Baseline for peak_rss(). Not ru_maxrss: Linux carries the parent's RSS at fork across exec
    into a child's ru_maxrss, so it would report the parent's size. VmHWM belongs to this process's
    own address space, and writing 5 to clear_refs (Linux >= 4.0) restarts it from the current
    RSS, so earlier transients (building the model) do not count either. Falls back to
    ru_maxrss (an upper bound) where /proc is missing."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS"), "VmHWM"
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def peak_rss(how):
    if how == "VmHWM":
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(cfg):
    """Runs in a fresh process: build the model, take the baseline, run class_gradients on the
    first `classes` classes (the [K, m] output is allocated in full either way), report peaks."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    K = cfg["K"]
    model = train.build_model("resnet50", K).to(device)
    ds = RandomImages(torch.arange(K), size=cfg["size"], lazy=True)  # 1 sample per class
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    base, how = start_peak_rss()
    t0 = time.perf_counter()
    rows = gbg.class_gradients(model, ds, K, list(model.backbone.parameters()), sketch_dim=cfg["sketch"],
                               classes=range(cfg["classes"]), device=device, recalibrate_bn=False)
    sync(device)
    seconds = time.perf_counter() - t0
    res = {"rss_growth": peak_rss(how) - base, "how": how, "seconds": seconds,
           "P": sum(p.numel() for p in model.backbone.parameters()), "shape": list(rows.shape),
           "finite": bool(torch.isfinite(rows).all())}
    if device.type == "cuda":
        res["gpu_growth"] = torch.cuda.max_memory_allocated(device) - base_gpu
    print(json.dumps(res))


def bench_memory(args, device):
    K, sketch = 8142, 16384
    runs = [(32, 2)] if args.quick else [(32, 16), (224, 4)]
    print(f"(d) class_gradients at iNaturalist scale: K={K}, torchvision resnet50 (fc = Identity) + "
          f"Linear(2048, {K}), 1 sample per class, CountSketch m={sketch}; each run in a fresh "
          f"subprocess, peak RSS (VmHWM, restarted after building the model) minus the RSS then")
    print("    SMALL INPUTS and a SUBSET of the classes, so it runs in a minute on a CPU: the peak is "
          "the one-batch working set plus the [K, m] output, which is allocated whole from the start, "
          "so it does not grow with the number of classes computed")
    out = {}
    for size, n in runs:
        cfg = {"K": K, "sketch": sketch, "size": size, "classes": n, "device": str(device),
               "threads": torch.get_num_threads()}
        r = run_child(["--memory-child", json.dumps(cfg)], f"{size}x{size}")
        if r is None:
            continue
        dense = K * r["P"] * 4
        mem = r.get("gpu_growth", r["rss_growth"])
        where = (f"GPU peak {r['gpu_growth'] / GB:.2f} GB (host RSS +{r['rss_growth'] / GB:.2f} GB, "
                 f"which holds the [K, m] output)") if "gpu_growth" in r else f"peak RSS +{r['rss_growth'] / GB:.2f} GB"
        note = "" if r["how"] == "VmHWM" else " (ru_maxrss: an upper bound)"
        print(f"    3x{size}x{size} inputs, {n} classes in {r['seconds']:.1f} s: {where}{note}; "
              f"output {r['shape'][0]} x {r['shape'][1]} float32 = {K * sketch * 4 / GB:.2f} GB; "
              f"dense K x P = {K} x {r['P']:,} float32 = {dense / GB:.0f} GB "
              f"({dense / max(mem, r['rss_growth']):.0f}x more)")
        out[size] = (r, dense)
    return out


# --- (e) BCL's three views: made per sample (DataLoader workers) vs batched on the device ---------

def bench_views(args, device):
    """One epoch's BCL views of a CIFAR-10-LT-sized set (12,406 random uint8 32x32 images, batch 256):
    bcl_views' torchvision pipelines per sample (what the DataLoader workers run; timed in this
    process, 0 workers, so the seconds are the CPU work the workers share) vs data_lt.device_views
    on `device`. For scale, one ResNet-32 forward + backward over the three views of a batch."""
    n, bs = (2048, 256) if args.quick else (12406, 256)
    g = torch.Generator().manual_seed(0)
    ds = data_lt.TensorImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                              torch.arange(n) % 10, data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    cpu = torch.device("cpu")

    def epoch(views, dev):
        loader = data_lt.make_loader(ds, batches, train=True, device=dev, num_workers=0, seed=1, views=views)
        return sum(len(y) for _, y in loader)

    pipelines = data_lt.bcl_views("tensor", ds.mean, ds.std, (32, 32))
    epoch("device", device)  # warm-up (first calls, the copy of the set to the device)
    t_workers, w_workers, _ = timed(lambda: epoch(pipelines, cpu), cpu)
    t_device, w_device, _ = timed(lambda: epoch("device", device), device)
    model = train.build_model("resnet32", 10).to(device)
    x3 = torch.randn(3 * bs, 3, 32, 32, device=device)
    y3 = torch.arange(3 * bs, device=device) % 10
    step = lambda: F.cross_entropy(model(x3), y3).backward()
    step()
    t_step = statistics.median(timed(step, device)[0] for _ in range(2 if args.quick else 3))
    t_compute = t_step * len(batches)
    clock = "wall" if device.type == "cuda" else "CPU"
    print(f"(e) BCL views, one epoch of {n} images (batch {bs}, 3 views each), {clock} seconds:")
    print(f"    worker-made (torchvision per sample, the workers' total): {t_workers:.2f} s "
          f"({n / t_workers:.0f} images/s; wall {w_workers:.2f} s)")
    print(f"    device-made (device_views on {device}): {t_device:.2f} s ({n / t_device:.0f} images/s; "
          f"wall {w_device:.2f} s)")
    print(f"    worker-made / device-made: {t_workers / t_device:.1f}x")
    print(f"    ResNet-32 forward + backward over the 3 views, one epoch (estimated from "
          f"{t_step:.2f} s per batch): {t_compute:.1f} s; views' share of a BCL epoch: worker-made "
          f"{t_workers / (t_workers + t_compute):.0%}, device-made {t_device / (t_device + t_compute):.0%}")
    return dict(setup=f"{n} images, batch {bs}", workers=t_workers, device=t_device,
                ratio=t_workers / t_device, compute=t_compute)


# --- driver ---------------------------------------------------------------------------------

def hardware(device):
    lines = [f"torch {torch.__version__}, python {platform.python_version()}, device {device}"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines.append(f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, numpy BLAS "
                 f"threads {os.environ['OPENBLAS_NUM_THREADS']}, load average {load} (1/5/15 min)")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--only", default="a,b,c,d,e,f,g,h,i", help="comma-separated parts to run, e.g. b,c")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 (default) because the cores are shared, and a second "
                        "thread waiting on a busy core makes every op as slow as its straggler")
    p.add_argument("--ref-batches", type=int, default=1,
                   help="batches the authors' scheme is timed on (then extrapolated to the epoch)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--imagenet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        return memory_child(json.loads(args.memory_child))
    if args.steps_child:
        torch.set_num_threads(args.threads)
        args.keep_memory = train.keep_freed_memory()
        return print(json.dumps(bench_steps(args, torch.device("cpu"), imagenet=args.imagenet)))
    parts = {s.strip() for s in args.only.split(",") if s.strip()}
    if not parts <= set("abcdefghi"):
        p.error(f"--only takes a comma-separated subset of a,b,c,d,e,f,g,h,i; got {args.only!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; pass --device cpu")
    torch.set_num_threads(args.threads)
    print("\n".join(hardware(device)))
    print(f"mode: {'QUICK (smaller sizes; numbers not for the README)' if args.quick else 'full'}; clock: "
          f"{'wall time, CUDA synchronised' if device.type == 'cuda' else 'process CPU time (wall where said)'}\n")

    t_start = time.perf_counter()
    res = {}
    if "a" in parts:
        res["a"] = bench_class_gradients(args, device)
        print()
    if "b" in parts:
        res["b"] = bench_steps(args, device)
        print()
        if device.type == "cpu":
            res["b_kept"] = bench_steps_kept_memory(args)
            print()
    if "i" in parts:
        res["i"] = bench_steps(args, device, imagenet=True)
        print()
        if device.type == "cpu":
            res["i_kept"] = bench_steps_kept_memory(args, imagenet=True)
            print()
    if "c" in parts:
        res["c"] = bench_min_norm(args)
        print()
    if "d" in parts:
        res["d"] = bench_memory(args, device)
        print()
    if "e" in parts:
        res["e"] = bench_views(args, device)
        print()
    if "f" in parts:
        res["f"] = bench_amp(args, device)
        print()
    if "g" in parts:
        res["g"] = bench_compile(args, device)
        print()
    if "h" in parts:
        res["h"] = bench_num_groups(args)
        print()

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s), CPU time"
    print(f"total {time.perf_counter() - t_start:.0f} s\n")
    print(f"| what ({hw}{', QUICK' if args.quick else ''}) | measured | target |")
    print("|---|---|---|")
    if "a" in res:
        a = res["a"]
        print(f"| class_gradients / one CE epoch ({a['setup']}) | {a['cg_vs_ce']:.2f}x | <= 1.5x |")
        print(f"| authors' per-class-backward scheme / one CE epoch (estimated) | {a['ref_vs_ce']:.1f}x "
              f"({a['ref_vs_cg']:.0f}x class_gradients) | - |")
    if "b" in res:
        b = res["b"]
        print(f"| exact G=4 MGDA step / CE step ({b['setup']}) | {b['exact_vs_ce']:.2f}x (floor here "
              f"{b['floor']:.2f}x) | <= 3.3x (floor ~3x) |")
        print(f"| exact G=4 MGDA step / its floor (1 forward + 4 backwards, same run), gbg as a library | "
              f"{b['exact_vs_floor']:.3f}x | - |")
        print(f"| last-stage MGDA step (--moo-grad last) / CE step | {b['last_vs_ce']:.2f}x | - |")
        print(f"| --moo-every 4 (mean step) / CE step | {b['every'][4]:.2f}x (reused-weight step "
              f"{b['reuse_vs_ce']:.2f}x) | - |")
        k = res.get("b_kept")
        if k:
            print(f"| as train.py runs on the CPU (malloc keeping freed memory): exact / last / every 4 | "
                  f"{k['exact_vs_ce']:.2f}x (floor {k['floor']:.2f}x) / {k['last_vs_ce']:.2f}x / {k['every']['4']:.2f}x | - |")
            print(f"| exact G=4 MGDA step / its floor, as train.py runs on the CPU | {k['exact_vs_floor']:.3f}x | "
                  f"<= 1.08x |")
    for part in ("b", "i"):  # --moo-grad's modes side by side (results/bench_moo_grad_cpu.txt)
        for key, how in ((part, "gbg as a library"), (f"{part}_kept", "as train.py runs on the CPU")):
            r = res.get(key)
            if r:
                print(f"| --moo-grad exact / last / --moo-every 4 / features, step / CE step ({r['setup']}, {how}) | "
                      f"{r['exact_vs_ce']:.2f}x / {r['last_vs_ce']:.2f}x / {r['every'][4 if key == part else '4']:.2f}x / "
                      f"{r['features_vs_ce']:.2f}x | features <= 1.1x |")
    if "c" in res:
        c = res["c"]
        shown = [G for G in (4, 100, 1000) if G in c]
        print(f"| min_norm_weights, G = {' / '.join(map(str, shown))} (iid / shared gradients) | "
              + " ; ".join(f"{c[G][0] * 1e3:.2g} / {c[G][3] * 1e3:.2g} ms" for G in shown) + " | - |")
    if "d" in res:
        for size, (r, dense) in res["d"].items():
            mem = r.get("gpu_growth", r["rss_growth"])
            print(f"| class_gradients peak memory, iNat scale (K=8142, P={r['P'] / 1e6:.1f}M, sketch 16384, "
                  f"3x{size}x{size} inputs) | {mem / GB:.2f} GB (dense: {dense / GB:.0f} GB) | < 4 GB |")
    if "e" in res:
        e = res["e"]
        print(f"| BCL views of one epoch ({e['setup']}): worker-made / device-made | {e['ratio']:.1f}x "
              f"({e['workers']:.1f} s / {e['device']:.1f} s; the model's epoch {e['compute']:.0f} s) | - |")
    if "f" in res:
        f = res["f"]
        print(f"| --amp (bf16 + channels_last) / fp32 images/s: CE epoch, ResNet-32, CIFAR-10-LT-sized | "
              f"{f['ce_ratio']:.2f}x ({f['fp32']['ce']:.0f} -> {f['bf16']['ce']:.0f} img/s) | >= 1.6x |")
        print(f"| the same, exact G=4 MGDA step | {f['exact_ratio']:.2f}x ({f['fp32']['exact']:.0f} -> "
              f"{f['bf16']['exact']:.0f} img/s) | - |")
    if "g" in res:
        g = res["g"]
        print(f"| torch.compile / eager, CE step / exact MGDA step (fp32; compiling {g['compile_s']:.0f} s) | "
              f"{g['ce_eager'] / g['ce_compiled']:.2f}x / {g['exact_eager'] / g['exact_compiled']:.2f}x faster | "
              f"keep if > 1 |")
    if "h" in res:
        h = res["h"]
        print(f"| choose_num_groups(A, 8), 19 permutations, K = {' / '.join(map(str, h))} (numpy, "
              f"{os.environ['OPENBLAS_NUM_THREADS']} BLAS thread(s), CPU time) | "
              + " / ".join(f"{r['s']:.3g} s" for r in h.values()) + f" (peak +{max(r['peak_gb'] for r in h.values()):.1f} GB) | - |")


if __name__ == "__main__":
    main()
