"""train.py's step against direct computations: which losses a step has (CE, logit-adjusted CE,
BCL) and how it is taken (plain, averaged groups, MGDA with its flags), on a float64 ResNet-8,
p.grad compared with separate autograd passes to 1e-10."""
import argparse
import sys
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gbg
import train as T

torch.set_num_threads(1)
K = 6
C2G = torch.tensor([0, 0, 1, 1, 2, 2])
COUNTS = np.array([60, 30, 12, 6, 3, 2])


def make_args(**kw):
    args = dict(loss="ce", moo="mgda", moo_every=1, moo_grad="exact", moo_gram="all", normalize="l2",
                moo_update="scaled", bcl_group_loss="la", sampler="random", la_weight=2.0, bcl_weight=1.6, bcl_temp=0.1, distributed=False,
                world_size=1, amp=False, group_loss="class", ratio_every=0, lr=0.0, warmup_epochs=0,
                schedule="step", lr_drops=None, lr_gamma=0.1, epochs=10, print_freq=1000, rank=0, output_dir="unused")
    args.update(kw)
    args.setdefault("augment", "release" if args["loss"] == "bcl" else "crop-flip")
    args.setdefault("class_balanced", False)
    return argparse.Namespace(**args)


def make_model(bcl=False, seed=0):
    torch.manual_seed(seed)
    model = T.build_model("resnet8", K)
    if bcl:
        model = T.make_bcl_model(model, COUNTS)
    return model.double().train()


def batch(seed, bcl=False, B=16, drop=()):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (B,), generator=g)
    for k in drop:  # make a group absent
        y[y == k] = 0
    views = [torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3 if bcl else 1)]
    return (views if bcl else views[0]), y


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


def reference(model, x, y, args, weights=None):
    """p.grad expected after one step, from separate autograd passes on a copy of the model."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    bcl = args.loss == "bcl"
    xx = torch.cat(x) if bcl else x
    z = model.forward_features(xx)
    logits = model.fc(z[:len(y)])
    if bcl and args.bcl_group_loss == "la":
        # logit adjustment, tau = 1: + log class prior (the model keeps it in float32)
        logits = logits + torch.log(torch.as_tensor(COUNTS / COUNTS.sum(), dtype=torch.float32)).double()
    # the group losses by hand: class, Eq. 10's mean of the class means; sample, the mean over the
    # group's samples (the release's, --loss bcl's default)
    ce = F.cross_entropy(logits, y, reduction="none")
    groups = C2G[y]
    idx = sorted(set(groups.tolist()))
    if args.group_loss == "class":
        L = {i: torch.stack([ce[y == k].mean() for k in sorted(set(y[groups == i].tolist()))]).mean() for i in idx}
    else:
        L = {i: ce[groups == i].mean() for i in idx}
    g = [torch.cat([t.reshape(-1) for t in grads(L[i], params)]) for i in idx]
    flat = torch.stack(g)
    la = args.la_weight if bcl else 1.0
    if args.moo == "none":
        d = flat.mean(0)
    else:
        if weights is None:
            cols = [i for i, n in enumerate(names) if not n.startswith(("head.", "head_fc."))]
            if args.moo_gram == "backbone":
                cols = [i for i in cols if not names[i].startswith("fc.")]
            sizes = [p.numel() for p in params]
            off = np.cumsum([0] + sizes)
            mask = torch.zeros(flat.shape[1], dtype=torch.bool)
            for i in cols:
                mask[off[i]:off[i + 1]] = True
            sub = flat[:, mask]
            n = sub.norm(dim=1)
            alpha = gbg.min_norm_weights((sub @ sub.T) / torch.outer(n, n))
            weights = (alpha / n) / (alpha / n).sum()
        d = torch.as_tensor(weights, dtype=torch.float64) @ flat
    d = la * d
    if bcl:
        contrast = args.bcl_weight * T.bcl_contrast(model, z, y, args.bcl_temp)
        d = d + torch.cat([t.reshape(-1) for t in grads(contrast, params)])
    return d


def step(model, x, y, args, state=None, step_index=0):
    model.zero_grad(set_to_none=True)
    # the step's losses as train_one_epoch takes them (step_losses passes --group-loss on)
    _, _, mean_loss, contrast, losses, present, z = T.step_losses(model, x, y, C2G, 3, args, torch.device("cpu"))
    out = T.take_step(losses, present, mean_loss, contrast, model, args, {} if state is None else state, step_index,
                      features=z)
    got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])
    return got, out


@pytest.mark.parametrize("group_loss", ["class", "sample"])
@pytest.mark.parametrize("gram", ["all", "backbone"])
@pytest.mark.parametrize("loss", ["ce", "bcl", "bcl-ce"])
def test_mgda_step_matches_separate_passes(loss, gram, group_loss):
    """CE: d over every parameter. BCL: logit-adjusted group losses (plain CE ones with
    --bcl-group-loss ce, the release), p.grad = la_weight * d + the contrastive gradient (heads get
    only the latter); the Gram over the backbone alone when asked; group losses as class means
    (Eq. 10) or sample means (--group-loss sample), each against its by-hand definition."""
    loss, bcl_group_loss = (loss, "la") if loss != "bcl-ce" else ("bcl", "ce")
    args = make_args(loss=loss, moo_gram=gram, bcl_group_loss=bcl_group_loss, group_loss=group_loss)
    model = make_model(bcl=loss == "bcl")
    x, y = batch(1, bcl=loss == "bcl")
    want = reference(model, x, y, args)
    got, out = step(model, x, y, args)
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()
    assert len(out["alpha"]) == 3


@pytest.mark.parametrize("loss", ["ce", "bcl"])
def test_average_step_matches_separate_passes(loss):
    args = make_args(loss=loss, moo="none")
    model = make_model(bcl=loss == "bcl")
    x, y = batch(2, bcl=loss == "bcl")
    got, _ = step(model, x, y, args)
    assert torch.allclose(got, reference(model, x, y, args), rtol=0, atol=1e-10)


def test_last_stage_gram_equals_exact_step_with_that_gram():
    """--moo-grad last: the G backwards stop at the last stage; alpha from the Gram of the last
    stage + classifier; the update, from one more backward, equals the exact step's with the same
    gram_params."""
    args = make_args(moo_grad="last")
    model = make_model()
    x, y = batch(3)
    got, out = step(model, x, y, args)
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    L, present = gbg.group_losses(ref(x), y, C2G, 3)
    last = T.last_stage_params(ref) + list(ref.fc.parameters())
    assert len(T.last_stage_params(ref)) < len(list(ref.backbone.parameters())) / 2
    want_out = gbg.mgda_backward(L[present], ref.parameters(), gram_params=last)
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert torch.allclose(out["alpha"], want_out["alpha"], atol=1e-10)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)


def features_weights(model, x, y, args):
    """--moo-grad features' weights from separate passes: each group's gradient w.r.t. z (every
    view's rows under BCL) and, with --moo-gram all, the classifier's weights, by its own forward."""
    rows = []
    for i in range(3):
        m = copy.deepcopy(model)
        z = m.forward_features(torch.cat(x) if args.loss == "bcl" else x)
        logits = m.fc(z[:len(y)])
        if args.loss == "bcl" and args.bcl_group_loss == "la":
            logits = logits + torch.log(torch.as_tensor(COUNTS / COUNTS.sum(), dtype=torch.float32)).double()
        L = gbg.group_losses(logits, y, C2G, 3, mode=args.group_loss)[0][i]
        inputs = [z] + (list(m.fc.parameters()) if args.moo_gram == "all" else [])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, inputs)]))
    rows = torch.stack(rows)
    n = rows.norm(dim=1)
    alpha = gbg.min_norm_weights((rows @ rows.T) / torch.outer(n, n))
    return (alpha / n) / (alpha / n).sum()


@pytest.mark.parametrize("gram", ["all", "backbone"])
@pytest.mark.parametrize("loss", ["ce", "bcl"])
def test_features_step_matches_separate_passes(loss, gram):
    """--moo-grad features: alpha from the Gram of [dL_i/dz, dL_i/d(fc)] (z alone with --moo-gram
    backbone), then one backward of sum w_i L_i; under BCL la_weight times that plus the
    contrastive gradient, which stays out of the Gram (z holds the three views' rows)."""
    args = make_args(loss=loss, moo_grad="features", moo_gram=gram)
    model = make_model(bcl=loss == "bcl")
    x, y = batch(8, bcl=loss == "bcl")
    w = features_weights(model, x, y, args)
    got, out = step(model, x, y, args)
    assert torch.allclose(out["weights"], w, rtol=0, atol=1e-10)
    assert torch.allclose(got, reference(model, x, y, args, weights=w), rtol=0, atol=1e-10)
    assert not torch.allclose(got, reference(model, x, y, args), atol=1e-6)  # not the exact step's weights


def test_features_step_under_amp():
    """--amp: z comes out of the backbone in bf16, its gradients too; the Gram is still taken in
    float64 and the weights stay those of fp32 to bf16's precision."""
    args = make_args(moo_grad="features")
    model = make_model().float()
    x, y = batch(9)
    _, fp32 = step(model, x.float(), y, args)
    got, amp = step(model, x.float(), y, make_args(moo_grad="features", amp=True))
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    assert torch.allclose(amp["weights"], fp32["weights"], atol=0.05), (amp["weights"], fp32["weights"])


def test_moo_every_reuses_the_weights_until_the_groups_change():
    args = make_args(moo_every=3)
    model = make_model()
    state = {}
    x0, y0 = batch(4)
    _, out0 = step(model, x0, y0, args, state, 0)
    w0 = out0["weights"]
    x1, y1 = batch(5)
    got1, out1 = step(model, x1, y1, args, state, 1)  # not solved: one backward with w0
    assert "alpha" not in out1
    assert torch.allclose(got1, reference(model, x1, y1, args, weights=w0), rtol=0, atol=1e-10)
    assert not torch.allclose(got1, reference(model, x1, y1, args), atol=1e-6)  # a fresh solve differs
    x2, y2 = batch(6, drop=(4, 5))  # group 2 absent: solved again, on the groups present
    got2, out2 = step(model, x2, y2, args, state, 2)
    assert len(out2["alpha"]) == 2 and state["groups"] == [0, 1]
    assert torch.allclose(got2, reference(model, x2, y2, args), rtol=0, atol=1e-10)
    _, out3 = step(model, *batch(7), args, state, 3)  # step 3 = 0 mod 3: solved
    assert len(out3["alpha"]) == 3


def test_update_ratio_is_d_over_the_sample_mean_gradient():
    """train_one_epoch's update_ratio against |d| / |grad of the batch's mean CE| computed
    directly (lr 0 keeps the model fixed, so the reference sees the same weights)."""
    args = make_args(ratio_every=1, momentum=0.0)
    model = make_model()
    loader = [batch(8), batch(9)]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = T.train_one_epoch(model, loader, opt, 0, args, C2G, torch.device("cpu"))
    ratios = []
    for x, y in loader:
        d = reference(model, x, y, args)
        ref = copy.deepcopy(model)
        g = torch.cat([t.reshape(-1) for t in grads(F.cross_entropy(ref(x), y), list(ref.parameters()))])
        ratios.append((d.norm() / g.norm()).item())
    assert stats["update_ratio"] == pytest.approx(np.mean(ratios), rel=1e-9)
    assert stats["train_samples"] == 32


# ---------------------------------------------------------------------------------- host reads

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def reads_per_step(monkeypatch, args, class_to_group, steps=5):
    """Run train_one_epoch on `steps` batches, counting every call that reads a tensor's value on
    the host (on a GPU, each is a synchronisation), by step, with the function that made it."""
    log = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **kw):
            log.append((_name, sys._getframe(1).f_code.co_name))
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    per_step = []

    def loader():
        for i in range(steps):
            g = torch.Generator().manual_seed(20 + i)
            per_step.append(len(log))
            yield torch.randn(18, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(18) % K

    class Loader:
        def __iter__(self):
            return loader()

        def __len__(self):
            return steps
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    T.train_one_epoch(model, Loader(), opt, 0, args, class_to_group, torch.device("cpu"))
    per_step.append(len(log))
    return [log[a:b] for a, b in zip(per_step, per_step[1:])]


def test_no_host_reads_on_the_step_path_but_the_solve(monkeypatch):
    """Between the first and the last step (the progress line reads the device there): plain CE,
    the averaged groups and a step that reuses MGDA's weights read nothing; an MGDA solve reads
    the Gram and the losses once (in gbg.mgda_weights), and only without GAC batches which groups
    are present."""
    mid = slice(1, -1)
    assert all(r == [] for r in reads_per_step(monkeypatch, make_args(), None)[mid])
    assert all(r == [] for r in reads_per_step(monkeypatch, make_args(moo="none"), C2G)[mid])
    solve = [r for r in reads_per_step(monkeypatch, make_args(sampler="gac"), C2G)[mid]]
    assert all(r and {f for _, f in r} == {"mgda_weights"} and len(r) <= 2 for r in solve), solve
    every = reads_per_step(monkeypatch, make_args(sampler="gac", moo_every=3), C2G, steps=6)[1:4]
    assert every[0] == every[1] == [] and {f for _, f in every[2]} == {"mgda_weights"}, every
    plain = reads_per_step(monkeypatch, make_args(sampler="random"), C2G)[mid]
    assert all({f for _, f in r} == {"mgda_weights", "take_step"} for r in plain), plain


def test_compiled_backbone_takes_the_same_mgda_step():
    """--compile: the exact MGDA step (G backward passes through one compiled forward) and a
    reused-weights step give the eager p.grad (float32 kernels differ: 1e-4 relative)."""
    import torch.nn as nn
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    eager_model = T.Net(backbone, 8, K)
    compiled = T.compile_backbone(copy.deepcopy(eager_model))
    x, y = torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(18) % K
    args = make_args(sampler="gac", moo_every=2)
    for m in (eager_model, compiled):
        m.train()
        m.grads, state = [], {}
        for i in range(2):
            got, out = step(m, x, y, args, state, i)
            m.grads.append(got)
    for a, b in zip(eager_model.grads, compiled.grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_amp_runs_the_network_in_bf16_on_the_cpu():
    """--amp on the CPU: the backbone computes in bf16 (autocast) on channels_last inputs; the
    losses come back in float32."""
    seen = []
    model = make_model().float()
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % K
    for amp in (False, True):
        logits, mean_loss, _, _ = T.batch_losses(model, x, y, torch.bincount(y, minlength=K), make_args(amp=amp),
                                                 torch.device("cpu"))
        inp, out = seen[-1]
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        assert inp.is_contiguous(memory_format=torch.channels_last) == amp
        assert logits.dtype == mean_loss.dtype == torch.float32
