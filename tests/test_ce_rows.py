"""The flags behind issue #35's CE rows (where CE+GBG+MOO's gain comes from): --augment release
(the release's CIFAR training view for CE, against torchvision's own transforms with the same
draws, as BCL's view in tests/test_device_views.py), --class-balanced (the batch loss is the mean
of the batch's classes' mean losses, against that loss written by hand) and --lr-gamma (LDAM-DRW's
x0.01 drops, through lr_at)."""
import argparse
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import data_lt
import gbg
import train as T
from test_device_views import images, tv_cls_view


def parse(*argv):
    args = T.get_args_parser().parse_args(list(argv))
    args.world_size, args.distributed, args.amp = 1, False, False
    T.fill_defaults(args)
    if args.loss == "bcl":
        T.fill_bcl_defaults(args)
    return args


def tensor_data(x, y):
    ds = data_lt.TensorImages(x, torch.as_tensor(y), data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)
    return argparse.Namespace(kind="tensor", train=ds, mean=data_lt.CIFAR_MEAN, std=data_lt.CIFAR_STD)


# --- --augment --------------------------------------------------------------------------------------

def test_augment_defaults_and_refusals():
    assert parse().augment == "crop-flip"  # LDAM-DRW's view, this project's CE runs so far
    assert parse("--loss", "bcl").augment == "release"  # BCL's classification view always was the release's
    assert parse("--augment", "release").augment == "release"
    with pytest.raises(data_lt.UserError, match="drop --augment crop-flip"):
        parse("--loss", "bcl", "--augment", "crop-flip")
    args = parse("--augment", "release", "--dataset", "folder-lt")  # folder-lt of large images: known at loading
    files = argparse.Namespace(kind="files", mean=data_lt.IMAGENET_MEAN, std=data_lt.IMAGENET_STD)
    with pytest.raises(data_lt.UserError, match="read from image files: drop --augment release"):
        T.train_views(files, args)
    assert T.train_views(files, parse("--dataset", "imagenet-lt")) is None  # crop-flip: make_loader's own


def test_augment_release_device_view_equals_torchvision_ops():
    """--augment release on CIFAR-sized tensors (--views device, the default): each batch is the
    classification view of device_views, i.e. torchvision's ops and AutoAugment's own op code with
    that sample's draws, whatever the batch; crop-flip gives a plain tensor batch."""
    n, seed = 96, 35
    x, y = images(n, seed=3), torch.arange(n) % 10
    data, args = tensor_data(x, y), parse("--augment", "release")
    views = T.train_views(data, args)
    assert views == "device-cls"
    batches = [list(range(0, n, 2)), list(range(1, n, 2))]  # any split of the samples gives the same views
    loader = data_lt.make_loader(data.train, batches, train=True, device="cpu", views=views, seed=seed)
    p = data_lt.cls_view_params(seed, torch.arange(n), 32, 32)
    for idx, (xs, ys) in zip(batches, loader):
        assert isinstance(xs, list) and len(xs) == 1 and torch.equal(ys, y[idx])
        for row, i in enumerate(idx):
            assert torch.equal(xs[0][row], tv_cls_view(x[i], p, i, data.mean, data.std)), i
    # the same view as BCL's classification view of the same sample and seed
    bcl = data_lt.device_views(x[:8], torch.arange(8), seed, data.mean, data.std)
    assert torch.equal(data_lt.device_views(x[:8], torch.arange(8), seed, data.mean, data.std, 1)[0], bcl[0])
    plain = T.train_views(data, parse())
    assert plain is None
    (xb, _), = data_lt.make_loader(data.train, [list(range(8))], train=True, device="cpu", views=plain, seed=seed)
    assert torch.is_tensor(xb) and xb.shape == (8, 3, 32, 32)


def test_augment_release_worker_view_is_torchvisions_pipeline():
    """--views workers: the release's view as torchvision's transforms, RandomCrop(32, pad 4), flip,
    AutoAugment CIFAR10, to float, normalise, then one 16-px hole (GBG_v1 cifar_Group_full.py
    l.168-176), drawn from each sample's seed: built here from torchvision alone."""
    n, seed = 24, 7
    x, y = images(n, seed=4), torch.arange(n) % 10
    data, args = tensor_data(x, y), parse("--augment", "release", "--views", "workers")
    views = T.train_views(data, args)
    assert isinstance(views, list) and len(views) == 1
    ref = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                      v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(data_lt.CIFAR_MEAN, data_lt.CIFAR_STD)])
    (xs, ys), = data_lt.make_loader(data.train, [list(range(n))], train=True, device="cpu", num_workers=0,
                                    views=views, seed=seed)
    assert torch.equal(ys, y)
    holes = 0
    for i in range(n):
        torch.manual_seed(data_lt.sample_seed(seed, i))
        want = ref(x[i])
        cy, cx = torch.randint(0, 32, ()).item(), torch.randint(0, 32, ()).item()  # Cutout(1 hole, 16 px)
        want[:, max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8] = 0
        assert torch.equal(xs[0][i], want), i
        holes += int((want == 0).all(0).sum() >= 64)  # at least a quarter of the square survives clipping
    assert holes == n


def test_augment_changes_the_experiment_at_resume():
    assert "augment" not in T.RESUME_MAY_CHANGE
    saved = parse("--grouping", "none", "--moo", "none")
    ckpt = {"args": vars(saved), "epoch": 3}
    with pytest.raises(data_lt.UserError, match="--augment crop-flip.*--augment release"):
        T.check_resume_flags(ckpt, parse("--grouping", "none", "--moo", "none", "--augment", "release"), "ckpt")
    with pytest.raises(data_lt.UserError, match="--lr-gamma"):
        T.check_resume_flags(ckpt, parse("--grouping", "none", "--moo", "none", "--lr-gamma", "0.01"), "ckpt")
    with pytest.raises(data_lt.UserError, match="--class-balanced"):
        T.check_resume_flags(ckpt, parse("--grouping", "none", "--moo", "none", "--class-balanced"), "ckpt")


def test_a_checkpoint_older_than_the_new_flags_is_compared_with_what_it_ran():
    """A checkpoint written before --lr-gamma, --augment and --class-balanced existed does not
    record them: it ran x0.1 drops, no re-balancing, and crop-flip under CE (BCL's release view
    under BCL). Changing any of them at resume is refused as for a new checkpoint; the defaults resume."""
    for loss, view, other in (("ce", "crop-flip", "release"), ("bcl", "release", None)):
        saved = vars(parse("--loss", loss, "--grouping", "none", "--moo", "none"))
        old = {"args": {k: v for k, v in saved.items() if k not in ("lr_gamma", "augment", "class_balanced")},
               "epoch": 3}
        T.check_resume_flags(old, parse("--loss", loss, "--grouping", "none", "--moo", "none"), "ckpt")
        T.check_resume_flags(old, parse("--loss", loss, "--grouping", "none", "--moo", "none", "--augment", view),
                             "ckpt")
        for flags, name in ((("--lr-gamma", "0.01"), "--lr-gamma"), (("--class-balanced",), "--class-balanced"),
                            (("--augment", other), "--augment")):
            if other is None and name == "--augment":
                continue  # BCL has one view (fill_defaults refuses crop-flip)
            with pytest.raises(data_lt.UserError, match=f"another run.*{name}"):
                T.check_resume_flags(old, parse("--loss", loss, "--grouping", "none", "--moo", "none", *flags), "ckpt")


# --- --class-balanced --------------------------------------------------------------------------------

def by_hand_mean_of_class_means(logits, y):
    per_class = [F.cross_entropy(logits[y == k], y[y == k]) for k in sorted(set(y.tolist()))]
    return sum(per_class) / len(per_class)


def step_gradient(model, x, y, args, class_to_group):
    G = 0 if class_to_group is None else int(class_to_group.max()) + 1
    model.zero_grad(set_to_none=True)
    counts, _, mean_loss, contrast, losses, present, _ = T.step_losses(model, x, y, class_to_group, G, args,
                                                                     torch.device("cpu"))
    T.take_step(losses, present, mean_loss, contrast, model, args, {}, 0)
    return [p.grad.clone() for p in model.parameters()]


def test_class_balanced_step_is_the_mean_of_class_means():
    torch.manual_seed(0)
    K = 10
    model = T.build_model("resnet8", K).double()
    x = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0] * 20 + [1] * 10 + [3] * 6 + [7] * 3 + [9])  # long-tailed, classes 2, 4-6, 8 absent
    args = parse("--grouping", "none", "--moo", "none", "--class-balanced", "--arch", "resnet8")
    mine = step_gradient(model, x, y, args, torch.arange(K))  # main(): every class with images its own group
    model.zero_grad(set_to_none=True)
    by_hand_mean_of_class_means(model(x), y).backward()
    for a, p in zip(mine, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)
    # the plain CE row (no --class-balanced) is the sample mean, which differs on this batch
    plain = step_gradient(model, x, y, parse("--grouping", "none", "--moo", "none"), None)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12) for a, p in zip(plain, model.parameters()))
    assert not torch.allclose(plain[-1], mine[-1], rtol=1e-3)


def test_class_balanced_run_gives_every_class_its_own_group(monkeypatch, tmp_path):
    """End to end: train.py with --class-balanced averages one loss per class present in the batch
    (average_step sees K losses and weights 1/(classes present) on them); without it, no groups."""
    seen = []
    real = T.average_step

    def spy(losses, present, la, extra, params, pg):
        seen.append((len(losses), present.clone()))
        return real(losses, present, la, extra, params, pg)

    monkeypatch.setattr(T, "average_step", spy)
    argv = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--workers", "0", "--print-freq",
            "1000", "--batch-size", "128", "--epochs", "1", "--grouping", "none", "--moo", "none"]
    for extra, out in (([], "plain"), (["--class-balanced"], "cb")):
        with contextlib.redirect_stdout(io.StringIO()):
            T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(
                argv + extra + ["--output-dir", str(tmp_path / out)]))
        if not extra:
            assert seen == []  # the CE row: the sample mean, no average step
    assert seen and all(g == 10 for g, _ in seen)
    assert all(2 <= int(p.sum()) <= 10 for _, p in seen)


# --- --lr-gamma ------------------------------------------------------------------------------------

def test_lr_gamma_gives_ldam_drws_schedule():
    """LDAM-DRW's adjust_learning_rate (cifar_train.py l.366-378): epoch + 1 > 160 -> lr x0.01,
    > 180 -> x0.0001, i.e. 0-based epochs 160 and 180, a factor 0.01 at each drop."""
    ldam = parse("--lr-gamma", "0.01", "--batch-size", "128", "--wd", "2e-4")
    assert (ldam.epochs, ldam.lr, ldam.batch_size, ldam.wd) == (200, 0.1, 128, 2e-4)
    ref = lambda e: 0.1 * (0.0001 if e + 1 > 180 else 0.01 if e + 1 > 160 else 1.0)
    for e in range(6, 200):  # after the warm-up
        assert T.lr_at(e, ldam) == pytest.approx(ref(e), rel=1e-12), e
        assert T.lr_at(e + 0.5, ldam) == pytest.approx(ref(e), rel=1e-12), e
    default = parse()
    assert [T.lr_at(e, default) for e in (159.9, 160, 180)] == pytest.approx([0.1, 0.01, 0.001])
    with pytest.raises(data_lt.UserError, match="--lr-gamma 0.0 must be positive"):
        parse("--lr-gamma", "0")


def test_step_schedule_flags_under_a_cosine_schedule_are_refused():
    """--lr-gamma and --lr-drops shape the step schedule only: given on a cosine run (ImageNet-LT's
    and iNat's recipe, or --schedule cosine) they would be recorded and do nothing."""
    with pytest.raises(data_lt.UserError, match="--lr-gamma 0.01 shapes the step schedule.*imagenet-lt recipe"):
        parse("--dataset", "imagenet-lt", "--lr-gamma", "0.01")
    with pytest.raises(data_lt.UserError, match="--lr-drops 30 60 and --lr-gamma 0.5 shape.*drop them"):
        parse("--schedule", "cosine", "--lr-drops", "30", "60", "--lr-gamma", "0.5")
    assert parse("--dataset", "imagenet-lt", "--schedule", "step", "--lr-gamma", "0.01").lr_gamma == 0.01
    assert parse("--dataset", "imagenet-lt").lr_gamma == 0.1  # the default, unused, as before


def test_release_view_on_image_files_is_refused_before_the_data_loads():
    """--augment release under CE is the release's CIFAR view: on ImageNet-LT / iNat it would fail
    only after the data had loaded (and on a cluster, after the queue)."""
    for dataset in ("imagenet-lt", "inat2018"):
        with pytest.raises(data_lt.UserError, match=f"{dataset} is read from image files.*drop --augment release"):
            parse("--dataset", dataset, "--augment", "release")
        assert parse("--dataset", dataset, "--loss", "bcl").augment == "release"  # BCL's own views there
