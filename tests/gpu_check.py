#!/usr/bin/env python
"""One short check of this code on a CUDA GPU, to run before long GPU runs (under 3 minutes):

    python tests/gpu_check.py OUT        # writes OUT/report.json and OUT/report.md

(a) syncs and speed: a few training steps each of CE, CE+GBG+MOO (the exact MGDA step), BCL and
    BCL+GBG+MOO (views made on the GPU), and CE+GBG+MOO with --compile, through train.py's own
    functions, ResNet-32, batch 256, --amp, on a CIFAR-10-LT-sized set of random images held on the
    GPU, under torch.cuda.set_sync_debug_mode("warn"). Counted: the synchronising CUDA calls of
    each step between the first and the last (expected 0 for CE and BCL, 1 per MGDA solve: the
    Gram and the losses copied to the host; tests/test_host_sync.py checks the same on the CPU),
    and of one grouping pass; measured: train.py's images/s of each.
(b) bench part (f) of tests/bench_gbg.py on the GPU: images/s of a CE epoch and of exact G = 4
    MGDA steps, ResNet-32, batch 256, fp32 and bf16 autocast + channels_last (--amp).
(c) --deterministic: the same CE+GBG+MOO steps twice from one state end in bit-identical weights
    (and whether they do without it).
(d) with two GPUs visible: tests/test_distributed.py's float64 run over 2 NCCL processes against 1
    process (the weights to 1e-8).
tests/repro.py runs it before its rows when --device is cuda and sizes the rows from (a)'s and
(b)'s images/s. On a machine without CUDA it refuses in one line.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# --deterministic's cuBLAS setting must precede CUDA's start, and part (c) sets it mid-run
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data_lt  # noqa: E402
import train as T  # noqa: E402

SYNC_MESSAGE = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says
STEPS = 6              # steps per measured epoch; the first and the last read the progress line
BATCH = 256            # the paper's and the release's batch
GROUPS = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])  # 4 groups of CIFAR-10's classes (fixed: no grouping needed)
KINDS = {  # train.py flags of each measured kind: (loss, grouped, compiled)
    "ce": ("ce", False, False), "gbg": ("ce", True, False), "bcl": ("bcl", False, False),
    "bcl_gbg": ("bcl", True, False), "gbg_compile": ("ce", True, True)}


def sync_count(caught):
    """How many of the caught warnings are set_sync_debug_mode's."""
    return sum(SYNC_MESSAGE in str(w.message) for w in caught)


class Counting:
    """warnings caught while active; marks() between the loader's batches give each step's."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.set_warn_always(True)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        torch.set_warn_always(False)
        return self._catch.__exit__(*exc)

    def syncs(self):
        return sync_count(self.caught)

    def where(self, start=0):
        """file:line of each synchronisation since `start` (the Python line that called the op)."""
        return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in self.caught[start:]
                       if SYNC_MESSAGE in str(w.message)})


class Marked:
    """Loader wrapper: counts the syncs seen at the start of each batch."""

    def __init__(self, loader, counting):
        self.loader, self.counting, self.marks = loader, counting, []

    def __iter__(self):
        for batch in self.loader:
            self.marks.append(self.counting.syncs())
            yield batch

    def __len__(self):
        return len(self.loader)

    def per_step(self):
        ends = self.marks[1:] + [self.counting.syncs()]
        return [b - a for a, b in zip(self.marks, ends)]


def make_args(loss, amp, compiled, batch_size=BATCH, **kw):
    args = dict(loss=loss, moo="mgda", moo_every=1, moo_grad="exact", moo_gram="all", normalize="l2",
                moo_update="scaled", bcl_group_loss="la", sampler="gac", la_weight=2.0, bcl_weight=1.6, bcl_temp=0.1,
                distributed=False, world_size=1, rank=0, amp=amp, group_loss="class", ratio_every=10, lr=0.1,
                warmup_epochs=0, schedule="step", lr_drops=None, lr_gamma=0.1, epochs=10, print_freq=10 ** 6, output_dir="unused",
                batch_size=batch_size, gac_fill=0.1, seed=0, num_groups=4, grouping="gbg", sketch_dim=0,
                grad_max_per_class=64, recalibrate_bn=True, workers=0, diag_batches=1, compile=compiled,
                ncut_assign="kmeans")
    args.update(kw)
    args.setdefault("augment", "release" if args["loss"] == "bcl" else "crop-flip")
    args.setdefault("class_balanced", False)
    return argparse.Namespace(**args)


def lt_data(device, n_max=5000, size=32):
    """CIFAR-10-LT's profile (IF 100: 5,000 ... 50 images, 12,406 in all) of random uint8 images, on the device."""
    labels = np.repeat(np.arange(10), data_lt.lt_counts(n_max, 10, 100))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=g)
    data = data_lt._tensor_data(images, labels, images[:BATCH], labels[:BATCH], 10)
    data.train, data.test = data.train.to(device), data.test.to(device)
    data.train_eval = data.train
    return data


def make_model(loss, data, device, amp, compiled, arch="resnet32"):
    torch.manual_seed(0)
    model = T.build_model(arch, data.num_classes)
    if loss == "bcl":
        model = T.make_bcl_model(model, data.class_counts)
    model.to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        T.compile_backbone(model)
    return model


def epoch(model, optimizer, data, args, device, class_to_group, counting, seed, steps=STEPS):
    """One train_one_epoch of `steps` GAC (or shuffled) batches; (syncs per step, images/s)."""
    sampler = T.make_sampler(data, None if class_to_group is None else GROUPS, args)
    sampler.set_epoch(seed)
    batches = [b for b, _ in zip(sampler, range(steps))]
    loader = Marked(data_lt.make_loader(data.train, batches, train=True, device=device, seed=seed,
                                        views="device" if args.loss == "bcl" else None), counting)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    stats = T.train_one_epoch(model, loader, optimizer, 0, args, class_to_group, device)  # ends with a host read
    return loader.per_step(), stats["train_samples"] / (time.perf_counter() - t0)


def measure(kind, device, amp=True, steps=STEPS, data=None, arch="resnet32", batch_size=BATCH):
    """(a) for one kind: a warm-up epoch (allocator, cuDNN, compilation), then a counted one."""
    loss, grouped, compiled = KINDS[kind]
    data = data or lt_data(device)
    args = make_args(loss, amp, compiled, batch_size)
    model = make_model(loss, data, device, amp, compiled, arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    class_to_group = data_lt.to_device(torch.as_tensor(GROUPS), device) if grouped else None
    t0 = time.perf_counter()
    with Counting() as counting:
        epoch(model, optimizer, data, args, device, class_to_group, counting, seed=1, steps=steps)
        warm_s = time.perf_counter() - t0
        start = len(counting.caught)
        per_step, images_per_s = epoch(model, optimizer, data, args, device, class_to_group, counting, seed=2,
                                       steps=steps)
        where = counting.where(start)
    middle = per_step[1:-1]
    return {"syncs_per_step": middle, "syncs_first_last": [per_step[0], per_step[-1]], "sync_lines": where,
            "expected_per_step": 1 if grouped else 0, "ok": all(n == (1 if grouped else 0) for n in middle),
            "images_per_s": images_per_s, "warm_up_s": warm_s}


GROUPING_SYNCS = 12  # tests/test_host_sync.py's bound for a grouping pass


def grouping_syncs(device, data=None, arch="resnet32"):
    """One train.make_groups pass (class gradients over 64 samples a class, recalibrated BatchNorm):
    its synchronisations, which must not grow with the samples (tests/test_host_sync.py: at most 12)."""
    data = data or lt_data(device)
    model = make_model("ce", data, device, amp=False, compiled=False, arch=arch)
    with Counting() as counting:
        t0 = time.perf_counter()
        T.make_groups(model, data, make_args("ce", False, False), device)
        n = counting.syncs()
        return {"syncs": n, "ok": n <= GROUPING_SYNCS, "sync_lines": counting.where(),
                "seconds": time.perf_counter() - t0}


def deterministic_repeat(device, steps=4, data=None, arch="resnet32", batch_size=BATCH):
    """(c) CE+GBG+MOO steps twice from the same state, with and without --deterministic (fp32, the
    mode it is for): whether the weights end bit-identical. Restores torch's global settings."""
    data = data or lt_data(device)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    out = {}
    try:
        for flag in (False, True):
            args = make_args("ce", False, False, batch_size, deterministic=flag)
            T.make_deterministic(args)
            finals = []
            for _ in range(2):
                model = make_model("ce", data, device, amp=False, compiled=False, arch=arch)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
                with Counting() as counting:
                    epoch(model, optimizer, data, args, device, data_lt.to_device(torch.as_tensor(GROUPS), device),
                          counting, seed=3, steps=steps)
                finals.append(torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()]))
            diff = (finals[0] - finals[1]).abs().max().item()
            out["deterministic" if flag else "default"] = {"bit_identical": diff == 0.0, "max_abs_diff": diff}
    except RuntimeError as e:  # an op without a deterministic kernel
        out["error"] = " ".join(str(e).split())[:300]
    finally:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[1:]
    out["ok"] = out.get("deterministic", {}).get("bit_identical", False)
    return out


def bench_f(device, quick=False):
    """(b) tests/bench_gbg.py's part (f) on the device."""
    import bench_gbg
    return bench_gbg.bench_amp(argparse.Namespace(quick=quick), device)


def two_gpus():
    """(d) tests/test_distributed.py's float64 runs ("exact" mode) with --device cuda, 1 process
    against 2 (NCCL): the largest difference of the final weights."""
    import test_distributed as D
    common = [("cuda" if a == "cpu" else a) for a in D.COMMON]
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "train_float64.py"
        wrapper.write_text(D.WRAPPER.format(root=str(ROOT), modes={"exact": D.MODES["exact"]}))
        outs = {}
        for n in (1, 2):
            cmd = [sys.executable, str(wrapper), *common, "--output-dir", f"{tmp}/p{n}"]
            if n > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + cmd[1:]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
            if r.returncode != 0:
                return {"ok": False, "error": f"{n} process(es): {(r.stdout + r.stderr)[-600:]}"}
            outs[n] = torch.load(f"{tmp}/p{n}/exact/checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    diff = max((outs[1][k].double() - outs[2][k].double()).abs().max().item() for k in outs[1])
    return {"ok": diff <= 1e-8, "max_abs_diff": diff}


def render(report):
    """report.md from report.json's dict."""
    a = report["steps"]
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, python {report['python']}; {report['wall_s']:.0f} s; "
             f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}", "",
             "| steps (ResNet-32, batch 256, --amp) | syncs per step (expected) | images/s | where |",
             "|---|---|---|---|"]
    for kind, r in a.items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {kind} | {r.get('skipped') or r.get('error')} | - | - |")
            continue
        lines.append(f"| {kind} | {r['syncs_per_step']} ({r['expected_per_step']}) | {r['images_per_s']:.0f} | "
                     f"{', '.join(r['sync_lines']) or '-'} |")
    g = report.get("grouping")
    if g:
        lines.append(f"\nGrouping pass: {g['syncs']} syncs in {g['seconds']:.1f} s ({', '.join(g['sync_lines'])}).")
    f = report.get("bench_f")
    if f:
        lines.append(f"\nbench (f), images/s: fp32 CE {f['fp32']['ce']:.0f}, exact {f['fp32']['exact']:.0f}; "
                     f"bf16 CE {f['bf16']['ce']:.0f}, exact {f['bf16']['exact']:.0f}.")
    d = report.get("deterministic")
    if d:
        lines.append(f"\n--deterministic: {json.dumps(d)}")
    if report.get("two_gpus"):
        lines.append(f"\n2 processes against 1: {json.dumps(report['two_gpus'])}")
    return "\n".join(lines) + "\n"


def write_report(report, out):
    """report["ok"] (every part run passed: a part without a check passes unless it failed), then
    OUT/report.json and OUT/report.md."""
    parts = list(report["steps"].values()) + [report.get(k) for k in ("grouping", "bench_f", "deterministic",
                                                                      "two_gpus")]
    report["ok"] = all(r.get("ok", True) for r in parts if r and "skipped" not in r)
    Path(out, "report.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(out, "report.md").write_text(render(report))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for report.json and report.md")
    p.add_argument("--budget", type=float, default=170.0, help="seconds; parts that would start after it are skipped")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "python": platform.python_version(), "steps": {}}

    def save():
        report["wall_s"] = time.perf_counter() - t0
        write_report(report, out)

    data = lt_data(device)
    parts = [(kind, lambda kind=kind: measure(kind, device, data=data)) for kind in KINDS if kind != "gbg_compile"]
    parts += [("grouping", lambda: grouping_syncs(device, data)), ("bench_f", lambda: bench_f(device)),
              ("deterministic", lambda: deterministic_repeat(device, data=data))]
    if torch.cuda.device_count() >= 2:
        parts.append(("two_gpus", two_gpus))
    parts.append(("gbg_compile", lambda: measure("gbg_compile", device, data=data)))  # last: compiling is slow
    for name, run in parts:
        target = report["steps"] if name in KINDS else report
        if time.perf_counter() - t0 > args.budget:
            target[name] = {"skipped": f"--budget {args.budget:g} s spent"}
        else:
            try:
                target[name] = run()
            except Exception as e:  # one part failing must not hide the others
                target[name] = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}: {json.dumps(target[name])[:400]}", flush=True)
        save()
    print(render(report), end="")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
