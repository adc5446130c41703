"""tests/repro.py: its rows against train.py's own defaults, end to end on the CPU with one epoch on
a tiny JPEG tarball made here in the CIFAR-10 copy's layout (train/<class>/NNNN.jpg,
test/<class>/NNNN.jpg), --summarize, and the budget: its pieces on planted epoch times, the whole
policy on a simulated shared device, and the stop and cut paths end to end."""
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "repro.py"
spec = importlib.util.spec_from_file_location("repro", SCRIPT)
repro = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro)


# --- The rows -------------------------------------------------------------------------------------
def parse(*argv):
    import train
    args = train.get_args_parser().parse_args(list(argv))
    args.world_size = 1
    train.fill_defaults(args)
    if args.loss == "bcl":
        train.fill_bcl_defaults(args)
    return args


# Each row against the train.py command README gives for it (train.py's defaults are CE+GBG+MOO
# with GAC, and --sampler follows --grouping): the same options once train.py fills its defaults.
README_COMMANDS = {
    "ce": ["--grouping", "none", "--moo", "none"],
    "gbg": [],
    "avg": ["--moo", "none"],
    "moo": ["--grouping", "none"],
    "random": ["--grouping", "random"],
    "count_bins": ["--grouping", "count_bins"],
    "count": ["--grouping", "count"],
    "bcl": ["--loss", "bcl", "--grouping", "none", "--moo", "none"],
    "bcl_avg": ["--loss", "bcl", "--moo", "none"],
    "bcl_moo": ["--loss", "bcl", "--grouping", "none"],
    "bcl_gbg": ["--loss", "bcl"],
    "regroup": ["--regroup-every", "20"],
    # issue #35's rows (their README lines are proposed in the branch's report)
    "cb": ["--grouping", "none", "--moo", "none", "--class-balanced"],
    "gbg_sample": ["--group-loss", "sample"],
    "ce_aug": ["--grouping", "none", "--moo", "none", "--augment", "release"],
    "gbg_aug": ["--augment", "release"],
    "ce_ldam": ["--grouping", "none", "--moo", "none", "--batch-size", "128", "--wd", "2e-4", "--lr-gamma", "0.01"],
}


def test_rows_mean_what_their_names_say():
    import train
    assert set(repro.ROWS) == set(README_COMMANDS) | {"release", "release_ce"}
    base = ["--dataset", "folder-lt", "--epochs", "200"]
    for row, argv in README_COMMANDS.items():
        assert vars(parse(*base, *repro.ROWS[row].split())) == vars(parse(*base, *argv)), row
    # release: train.py's --preset release (refused with folder-lt, so compared on cifar10-lt) at the
    # protocol's IF 100 and 200 epochs. Only lr_drops differs in form ([160, 180] against the
    # 80/90 % rule), and the learning rate of every epoch is the same.
    base = ["--dataset", "cifar10-lt", "--imb-factor", "100", "--epochs", "200"]
    row, preset = vars(parse(*base, *repro.ROWS["release"].split())), vars(parse(*base, "--preset", "release"))
    assert {k for k in row if row[k] != preset[k]} == {"preset", "lr_drops"}
    a, b = parse(*base, *repro.ROWS["release"].split()), parse(*base, "--preset", "release")
    assert [train.lr_at(e, a) for e in range(200)] == [train.lr_at(e, b) for e in range(200)]
    assert row["loss"] == "bcl" and row["sampler"] == "random" and row["group_epoch"] == 0
    # release_ce: the same but for the loss (and the BCL-only options it leaves at their defaults)
    ce = vars(parse(*base, *repro.ROWS["release_ce"].split()))
    # (and the view: BCL's classification view is the release's, CE's crop and flip unless --augment release)
    assert {k for k in ce if ce[k] != row[k]} == {"loss", "bcl_group_loss", "la_weight", "bcl_weight", "bcl_temp",
                                                  "augment"}
    assert ce["loss"] == "ce"


def test_issue_35_rows_differ_from_their_pairs_in_what_they_isolate():
    """Each of issue #35's rows against the row it is read beside: only the flags it is about differ."""
    base = ["--dataset", "folder-lt", "--epochs", "200"]
    rows = {r: vars(parse(*base, *repro.ROWS[r].split())) for r in repro.ROWS if r not in ("release",)}
    diff = lambda a, b: {k for k in rows[a] if rows[a][k] != rows[b][k]}
    assert diff("cb", "ce") == {"class_balanced"} and rows["cb"]["class_balanced"]
    assert diff("gbg_sample", "gbg") == {"group_loss"} and rows["gbg_sample"]["group_loss"] == "sample"
    assert diff("ce_aug", "ce") == diff("gbg_aug", "gbg") == {"augment"} and rows["ce_aug"]["augment"] == "release"
    assert rows["ce"]["augment"] == rows["gbg"]["augment"] == "crop-flip"
    assert diff("ce_ldam", "ce") == {"batch_size", "wd", "lr_gamma"}
    # the protocol's --batch-size 256 comes first in run_command: the row's 128 wins
    args = repro.check_args(repro.get_args_parser().parse_args(["--device", "cpu", "--runs", "ce_ldam"]))
    cmd = repro.run_command(args, "ce_ldam", 0, Path("/o/ce_ldam_s0"))
    ldam = parse(*cmd[2:])
    assert (ldam.batch_size, ldam.wd, ldam.lr, ldam.warmup_epochs) == (128, 2e-4, 0.1, 5)
    # LDAM-DRW's adjust_learning_rate after its warm-up: x0.01 once epoch + 1 > 160, x0.0001 once > 180
    assert [train_lr(ldam, e) for e in range(5, 200)] == pytest.approx(
        [0.1 * (1e-4 if e + 1 > 180 else 1e-2 if e + 1 > 160 else 1) for e in range(5, 200)], rel=1e-12)


def train_lr(args, epoch):
    import train
    return train.lr_at(epoch, args)


def test_dataset_option_runs_on_the_official_files(tmp_path):
    """--dataset cifar10-lt: train.py reads torchvision's CIFAR-10 python files in --data (default
    data/, train.py's --data-root), nothing is unpacked, and a folder without them stops in one line."""
    args = repro.check_args(repro.get_args_parser().parse_args(["--device", "cpu", "--dataset", "cifar10-lt"]))
    assert args.data == ROOT / "data"
    cmd = repro.run_command(args, "ce", 0, Path("/o/ce_s0"))
    run = parse(*cmd[2:])
    assert (run.dataset, run.data_root, run.imb_factor) == ("cifar10-lt", str(ROOT / "data"), 100)
    jpeg = repro.check_args(repro.get_args_parser().parse_args(["--device", "cpu"]))
    assert jpeg.data == ROOT / ".data" / "cifar10" and parse(*repro.run_command(jpeg, "ce", 0, Path("/o"))[2:]).dataset \
        == "folder-lt"
    # another --dataset is another experiment: a folder made on the JPEG copy is not resumed on the official files
    assert repro.settings(cmd) != repro.settings(repro.run_command(jpeg, "ce", 0, Path("/o/ce_s0")))
    official = tmp_path / "root" / "cifar-10-batches-py"
    official.mkdir(parents=True)
    r = run_repro(tmp_path, "--device", "cpu", "--dataset", "cifar10-lt", "--data", str(tmp_path / "root"),
                  "--out", str(tmp_path / "o"), check=False)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "lacks the CIFAR-10 python files" in r.stderr
    for name in ("data_batch_1", "test_batch"):
        (official / name).write_bytes(b"")
    repro.ensure_data(tmp_path / "root", tmp_path / "no.tar.gz", "cifar10-lt")  # present: nothing to unpack
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar-10-batches-py"]


def test_run_command_puts_the_row_and_extra_after_the_protocol():
    args = repro.check_args(repro.get_args_parser().parse_args(
        ["--device", "cpu", "--runs", "gbg", "--extra", "--arch resnet8 --moo-grad last"]))
    cmd = repro.run_command(args, "gbg", 3, Path("/o/gbg_s3"))
    assert cmd[:2] == [sys.executable, str(ROOT / "train.py")]
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[cmd.index("--output-dir") + 1] == "/o/gbg_s3"
    assert "--amp" not in cmd and args.jobs == 1 and args.threads == 1
    tail = repro.ROWS["gbg"].split() + ["--arch", "resnet8", "--moo-grad", "last"]
    assert cmd[-len(tail):] == tail  # later flags win in argparse: --extra overrides the protocol's --arch
    assert vars(parse(*cmd[2:]))["arch"] == "resnet8"
    cuda = repro.check_args(repro.get_args_parser().parse_args(["--runs", "ce gbg,avg", "--seeds", "0,1"]))
    assert cuda.runs == ["ce", "gbg", "avg"] and cuda.seeds == [0, 1] and cuda.jobs == 6 and cuda.amp


# --- The budget's pieces, on planted epoch times --------------------------------------------------
# A grouping run: epoch 0 takes 10 s (start-up), the warm-up epochs 1-4 1 s each, epoch 5 (the
# grouping) 7 s, the MGDA epochs 6-9 3 s each.
STEPS = [10, 1, 1, 1, 1, 7, 3, 3, 3, 3]
LOG = [(e, float(np.cumsum(STEPS)[e])) for e in range(10)]


def test_pace_uses_the_epochs_that_measure_the_run_now():
    assert repro.pace(LOG[:1], 1, None) is None  # epoch 0 alone: no usable epoch
    assert repro.pace(LOG[:5], 1, None) == 1.0  # before the grouping: the warm-up pace (a lower bound)
    assert repro.pace(LOG, 1, 5) == 3.0  # after it: the MGDA epochs only, not the grouping epoch
    assert repro.pace(LOG[:6], 1, 5) is None
    assert repro.pace(LOG, 9, 5) == 3.0 and repro.pace(LOG, 10, 5) is None  # since: epochs begun after a change
    mixed = [(e, float(t)) for e, t in enumerate(np.cumsum([5, 2, 2, 2, 4, 4, 5]))]
    assert repro.pace(mixed, 1, None) == pytest.approx((4 + 4 + 5) / 3, abs=1e-12)  # the last RECENT = 3
    assert repro.pace([(0, 5.0), (2, 9.0), (3, 10.0)], 1, None) == 1.0  # epoch 2's step is unknown (1 missing)


def test_shared_ends_match_a_fluid_simulation():
    rng = random.Random(0)
    for _ in range(5):
        works = [rng.uniform(0.5, 3.0) for _ in range(rng.randint(1, 4))]
        left, t, dt, ends = list(works), 7.0, 1e-4, [None] * len(works)
        while any(e is None for e in ends):
            active = [i for i, e in enumerate(ends) if e is None]
            t += dt
            for i in active:
                left[i] -= dt / len(active)
                if left[i] <= 0:
                    ends[i] = t
        assert repro.shared_ends(works, 7.0) == pytest.approx(ends, abs=5e-4)
    assert repro.shared_ends([3.0, 1.0, 2.0], 10.0) == [16.0, 13.0, 15.0]  # by hand: 10 + 3*1, + 2*1, + 1*1


def test_runs_to_stop_keeps_runs_in_priority_order_while_they_fit():
    # Three runs sharing a GPU, 100 epochs left each at 0.3, 0.9, 0.6 s (measured with all three
    # going): alone they need 10, 30, 20 s. Ends: run 0 alone 10; with run 1: 20 and 40; all three 60.
    left, paces, final = [100, 100, 100], [0.3, 0.9, 0.6], [True] * 3
    assert repro.runs_to_stop(left, paces, final, 0.0, 60.0, True) == []
    assert repro.runs_to_stop(left, paces, final, 0.0, 59.0, True) == [2]
    # 30 s: runs 0 and 1 cannot both end (40 s), so run 1 goes; runs 0 and 2 end at 20 and 30.
    assert repro.runs_to_stop(left, paces, final, 0.0, 30.0, True) == [1]
    assert repro.runs_to_stop(left, paces, final, 0.0, 9.0, True) == [0, 1, 2]
    assert repro.runs_to_stop(left, paces, final, 100.0, 130.0, True) == [1]  # the same, 100 s later
    # Not measured yet: counted as needing no time, and not final.
    assert repro.runs_to_stop(left, [0.3, 0.9, None], [True, True, False], 0.0, 40.0, True) == []
    assert repro.runs_to_stop(left, [0.3, 0.9, None], [True, True, False], 0.0, 39.0, True) == [1]
    assert repro.runs_to_stop(left, [None, 0.9, 0.6], [False, True, True], 0.0, 29.0, True) == []
    # A lower bound before a run defers the stops after it: run 1 may yet go and make room for run 2
    # (at 30 s run 2 would stay: runs 0 and 2 fit); a run whose own lower bound does not fit goes.
    assert repro.runs_to_stop(left, paces, [True, False, True], 0.0, 59.0, True) == []
    assert repro.runs_to_stop(left, paces, [True, False, True], 0.0, 30.0, True) == [1]
    assert repro.runs_to_stop(left, paces, [True, True, False], 0.0, 59.0, True) == [2]
    # Cores of their own: each run keeps its pace, so exactly the runs that cannot end themselves stop.
    assert repro.runs_to_stop([100, 100], [1.0, 0.2], [True] * 2, 0.0, 50.0, False) == [0]
    assert repro.runs_to_stop([100, 100], [1.0, 0.2], [True] * 2, 0.0, 100.0, False) == []


def simulate(works, deadline, group_epoch=5, poll=1.0, dt=0.01):
    """Runs sharing one device equally (works[i][e]: run i's device-seconds for epoch e alone), the
    budget policy of repro.run_all applied every poll seconds: log.txt lines, groups.json at the
    start of the grouping epoch, `since` reset at every end and stop. -> per run (status, end)."""
    runs = [dict(w=w, epoch=0, done=0.0, log=[], since=1, grouped_at=None, status="running", end=None)
            for w in works]
    t, next_poll = 0.0, poll

    def changed():
        for r in runs:
            if r["status"] == "running":
                r["since"] = max([e for e, _ in r["log"]], default=-1) + 2

    while any(r["status"] == "running" for r in runs):
        going = [r for r in runs if r["status"] == "running"]
        t += dt
        for r in going:
            r["done"] += dt / len(going)
            if r["done"] >= r["w"][r["epoch"]]:
                r["done"] -= r["w"][r["epoch"]]
                r["log"].append((r["epoch"], t))
                r["epoch"] += 1
                if r["epoch"] == group_epoch and len(set(r["w"])) > 1:  # a grouping run writes groups.json
                    r["grouped_at"] = group_epoch
                if r["epoch"] == len(r["w"]):
                    r["status"], r["end"] = "done", t
        if any(r["status"] == "done" and r["end"] == t for r in going):
            changed()
        going = [r for r in runs if r["status"] == "running"]
        if t >= deadline:
            for r in going:
                r["status"], r["end"] = "cut", t
        elif t >= next_poll:
            next_poll += poll
            left = [len(r["w"]) - r["epoch"] for r in going]
            paces = [repro.pace(r["log"], r["since"], r["grouped_at"]) for r in going]
            final = [p is not None and (len(set(r["w"])) == 1 or r["grouped_at"] is not None)
                     for r, p in zip(going, paces)]
            stops = repro.runs_to_stop(left, paces, final, t, deadline, True)
            for i in stops:
                going[i]["status"], going[i]["end"] = "stopped", t
            if stops:
                changed()
    return [(r["status"], r["end"]) for r in runs]


def test_budget_policy_on_a_simulated_shared_device():
    # 40 epochs; alone: A (CE) 1 s each; B (GBG) 1 s warm-up epochs, 3 s grouping epoch, 3 s after;
    # C (averaged groups) 1 s, 3 s, 1.5 s. Work alone: A 40, B 110, C 59 s: all three 209 s, A + B 150.
    A = [1.0] * 40
    B = [1.0] * 5 + [3.0] + [3.0] * 34
    C = [1.0] * 5 + [3.0] + [1.5] * 34
    assert [s for s, _ in simulate([A, B, C], 215.0)] == ["done"] * 3  # everything fits: nothing stopped
    # 175 s: A and B fit once C is stopped early; C, the lowest priority, goes.
    out = simulate([A, B, C], 175.0)
    assert [s for s, _ in out] == ["done", "done", "stopped"]
    assert max(end for _, end in out[:2]) <= 175.0 and out[2][1] < 40.0
    # 120 s: B cannot end even beside A alone (A + B = 150 s of work), so B goes and C stays.
    out = simulate([A, B, C], 120.0)
    assert [s for s, _ in out] == ["done", "stopped", "done"]
    assert max(out[0][1], out[2][1]) <= 120.0


# --- End to end on the CPU ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """A tiny CIFAR-10-like JPEG tarball: 10 classes, 100 training images each (IF 100 keeps 100 ... 1)."""
    tmp = tmp_path_factory.mktemp("cifar")
    src, rng = tmp / "src", np.random.default_rng(0)
    for split, n in (("train", 100), ("test", 4)):
        for c in range(10):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            base = rng.integers(0, 255, 3)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg")
    path = tmp / "cifar10-jpg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(src / split, arcname=split)
    return path


def run_repro(tmp_path, *argv, check=True):
    # A decoy `python` first on PATH: every run must use the interpreter given (--python, by default
    # the one running repro.py), never whatever `python` the PATH finds.
    decoy = tmp_path / "decoy"
    decoy.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (decoy / name).write_text("#!/bin/sh\necho decoy python ran >&2\nexit 3\n")
        (decoy / name).chmod(0o755)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{decoy}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert "decoy" not in r.stdout + r.stderr
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_one_epoch_end_to_end_on_cpu_and_summarize(tmp_path, tarball):
    out, data = tmp_path / "out", tmp_path / "data"
    r = run_repro(tmp_path, "--device", "cpu", "--runs", "ce,gbg", "--epochs", "1", "--jobs", "2",
                  "--arch", "resnet8", "--extra", "--batch-size 64", "--data", str(data), "--tarball", str(tarball),
                  "--out", str(out))
    assert (data / "train" / "class0").is_dir() and not (tmp_path / "data.partial").exists()
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    assert f"machine: {model}" in r.stdout and "1 thread(s) each" in r.stdout and "wall time:" in r.stdout
    table = json.loads((out / "table.json").read_text())
    assert (out / "table.md").read_text() in r.stdout
    assert [l["run"] for l in table["runs"]] == ["ce_s0", "gbg_s0"] and table["means"] == []
    for line in table["runs"]:
        d = out / line["run"]
        wall = json.loads((d / "wall.json").read_text())
        assert set(wall) == {"run", "wall_s", "exit_code", "flags", "resumes", "commit", "command"}
        assert wall["resumes"] == 0 and wall["command"][:2] == [sys.executable, str(ROOT / "train.py")]
        assert wall["command"][-len(wall["flags"]):] == wall["flags"] and str(d) in wall["command"]
        assert wall["exit_code"] == 0 and wall["wall_s"] > 0 and wall["run"] == str(d)
        assert wall["flags"] == repro.ROWS[line["row"]].split() + ["--batch-size", "64"]
        results = json.loads((d / "results.json").read_text())
        args = results["args"]
        keys = ("dataset", "imb_factor", "arch", "batch_size", "epochs", "seed", "amp", "workers", "device")
        assert [args[k] for k in keys] == ["folder-lt", 100, "resnet8", 64, 1, 0, False, 0, "cpu"]
        assert args["data_root"] == str(data) and args["output_dir"] == str(d)
        log = [json.loads(l) for l in open(d / "log.txt")]
        assert len(log) == 1 and not list(d.glob("checkpoint*.pth")) and not (d / "stop.json").exists()
        assert line["status"] == "done" and line["epochs_done"] == 1 and line["seed"] == 0
        assert line["wall_s"] == wall["wall_s"] and line["images_per_s"] == log[0]["images_per_s"]
        assert [line[k] for k in ("top1", "many", "medium", "few")] == \
               [results["last"][k] for k in ("top1", "many", "medium", "few")]
        assert (line["best_top1"], line["best_epoch"]) == (results["best_test"]["top1"], results["best_test"]["epoch"])
        assert f"| {line['run']} | {line['top1']:.2f} |" in r.stdout
    gbg = json.loads((out / "gbg_s0" / "results.json").read_text())["args"]
    assert (gbg["grouping"], gbg["moo"], gbg["sampler"]) == ("gbg", "mgda", "gac")
    assert (out / "gbg_s0" / "groups.json").exists() and not (out / "ce_s0" / "groups.json").exists()

    # --summarize rebuilds the same table from the folders alone
    before = {f: (out / f).read_text() for f in ("table.json", "table.md")}
    for f in before:
        (out / f).unlink()
    (out / "table.json").write_text(json.dumps({k: v for k, v in json.loads(before["table.json"]).items()
                                                if k == "calls"}))  # the calls: kept from the earlier table
    s = run_repro(tmp_path, "--summarize", "--out", str(out))
    assert {f: (out / f).read_text() for f in before} == before and before["table.md"] in s.stdout

    # Two seeds of a row (a copy of ce_s0 as seed 1 with a planted top-1): one mean line
    shutil.copytree(out / "ce_s0", out / "ce_s1")
    res = json.loads((out / "ce_s1" / "results.json").read_text())
    res["last"]["top1"] = planted = table["runs"][0]["top1"] + 3.0
    (out / "ce_s1" / "results.json").write_text(json.dumps(res))
    run_repro(tmp_path, "--summarize", "--out", str(out))
    t2 = json.loads((out / "table.json").read_text())
    assert [l["run"] for l in t2["runs"]] == ["ce_s0", "ce_s1", "gbg_s0"]
    (mean,) = t2["means"]
    a = table["runs"][0]["top1"]
    assert mean["row"] == "ce" and mean["seeds"] == [0, 1]
    assert mean["top1"] == pytest.approx((a + planted) / 2, abs=1e-12)
    assert mean["top1_halfrange"] == pytest.approx(1.5, abs=1e-12)
    for k in ("many", "medium", "few"):  # the same in both seeds; None where the split has no such class
        one = table["runs"][0][k]
        assert (mean[k], mean[k + "_halfrange"]) == ((None, None) if one is None else (one, 0.0))
    assert f"{mean['top1']:.2f} ± 1.50" in (out / "table.md").read_text()


def test_issue_35_rows_run_end_to_end(tmp_path, tarball):
    """The CE rows of issue #35 through repro.py and train.py, one epoch each on the tiny copy: each
    run's results.json holds the flags its row names (the augmentation, the class-balanced loss, LDAM's
    batch, weight decay and drops)."""
    out = tmp_path / "out"
    run_repro(tmp_path, "--device", "cpu", "--runs", "cb,ce_aug,ce_ldam", "--epochs", "1", "--arch", "resnet8",
              "--data", str(tmp_path / "data"), "--tarball", str(tarball), "--out", str(out))
    got = {r: json.loads((out / f"{r}_s0" / "results.json").read_text())["args"] for r in ("cb", "ce_aug", "ce_ldam")}
    assert got["cb"]["class_balanced"] and got["cb"]["augment"] == "crop-flip"
    assert got["ce_aug"]["augment"] == "release" and got["ce_aug"]["views"] == "device"
    assert (got["ce_ldam"]["batch_size"], got["ce_ldam"]["wd"], got["ce_ldam"]["lr_gamma"]) == (128, 2e-4, 0.01)
    assert "augment release: views made on the device" in (out / "ce_aug_s0" / "stdout.txt").read_text()


def test_budget_stops_runs_that_cannot_finish(tmp_path, tarball):
    """Runs of 100,000 epochs under a 300 s budget: each is stopped once its pace is measured,
    long before the budget ends; the table reports no result for them."""
    out, data = tmp_path / "out", tmp_path / "data"
    r = run_repro(tmp_path, "--device", "cpu", "--runs", "ce", "gbg", "--epochs", "100000", "--jobs", "2",
                  "--arch", "resnet8", "--extra", "--batch-size 64", "--budget", "300", "--data", str(data),
                  "--tarball", str(tarball), "--out", str(out))
    table = json.loads((out / "table.json").read_text())
    for line in table["runs"]:
        d = out / line["run"]
        stop = json.loads((d / "stop.json").read_text())
        assert line["status"] == stop["status"] == "stopped" and "cannot end by 290 s" in stop["reason"]
        assert line["epochs_done"] >= 2 and all(line[k] is None for k in repro.RESULT_KEYS + ("best_epoch",))
        assert json.loads((d / "wall.json").read_text())["exit_code"] != 0
        assert (d / "checkpoint.pth").exists()  # an unfinished run keeps its checkpoint for a resume
        assert f"{line['run']}: stopped" in r.stdout


def test_budget_cuts_what_runs_at_its_end_and_starts_nothing_after(tmp_path, tarball):
    out, data = tmp_path / "out", tmp_path / "data"
    repro.ensure_data(data, tarball)  # unpacked beforehand: on a busy machine it can take the 1 s the runs get
    (out / "gbg_s0").mkdir(parents=True)
    (out / "gbg_s0" / "results.json").write_text("{}")  # an earlier run's file: not this run's result
    r = run_repro(tmp_path, "--device", "cpu", "--runs", "ce,gbg", "--epochs", "100000", "--budget", "11",
                  "--data", str(data), "--tarball", str(tarball), "--out", str(out))
    table = json.loads((out / "table.json").read_text())
    assert [(l["run"], l["status"]) for l in table["runs"]] == [("ce_s0", "cut"), ("gbg_s0", "not started")]
    assert all(l[k] is None for l in table["runs"] for k in repro.RESULT_KEYS)
    assert json.loads((out / "ce_s0" / "wall.json").read_text())["exit_code"] != 0
    assert sorted(p.name for p in (out / "gbg_s0").iterdir()) == ["stop.json"]
    assert "| ce_s0 |" in r.stdout and "cut" in r.stdout


@pytest.mark.parametrize("argv, words", [
    (["--runs", "ce,nope"], "unknown row(s) nope"), (["--runs", "ce", "ce"], "lists a row twice"),
    (["--seeds", "0,x"], "--seeds"), (["--epochs", "0"], "--epochs 0"), (["--budget", "5"], "--budget 5"),
    (["--extra", '"--a b'], "--extra"), (["--python", "/no/such/python"], "--python /no/such/python"),
    (["--data", "/no/such/data", "--tarball", "/no/such.tar.gz"], "no data: /no/such/data/train is missing"),
])
def test_bad_input_gives_one_line(tmp_path, argv, words):
    r = run_repro(tmp_path, "--device", "cpu", "--out", str(tmp_path / "o"), *argv, check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("repro.py: error: ") and words in r.stderr
    assert not (tmp_path / "o").exists()


def test_summarize_without_runs_gives_one_line(tmp_path):
    r = run_repro(tmp_path, "--summarize", "--out", str(tmp_path), check=False)
    assert r.returncode != 0 and r.stderr.startswith("repro.py: error: ") and "holds no run folders" in r.stderr


def test_the_same_command_resumes_a_run_killed_after_its_first_epoch(tmp_path, tarball):
    """Runs longer than a session: a call killed after the first epoch (SIGTERM to repro.py,
    whose runs are then killed outright), then the same command: the run goes on from its
    checkpoint and ends as an uninterrupted run of the same command does; a finished run is not
    run again; wall.json sums the two calls and counts the resume."""
    data = tmp_path / "data"
    argv = ["--device", "cpu", "--runs", "gbg", "--epochs", "3", "--arch", "resnet8", "--data", str(data),
            "--tarball", str(tarball), "--extra", "--batch-size 64 --group-epoch 1"]
    run_repro(tmp_path, *argv, "--out", str(tmp_path / "whole"))
    out = tmp_path / "cut"
    d = out / "gbg_s0"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(SCRIPT), *argv, "--out", str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (d / "checkpoint.pth").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    first = json.loads((d / "wall.json").read_text())
    log = [json.loads(l) for l in open(d / "log.txt")]
    assert len(log) < 3 and (d / "checkpoint.pth").exists(), "the call was not interrupted before the end"
    assert first["exit_code"] is not None and first["exit_code"] != 0 and first["resumes"] == 0
    s = run_repro(tmp_path, "--summarize", "--out", str(out))
    assert "unfinished (the same command resumes it)" in s.stdout

    r = run_repro(tmp_path, *argv, "--out", str(out))
    assert "resume gbg_s0" in r.stdout
    stdout = (d / "stdout.txt").read_text()
    assert "--- repro.py: resumed (1)" in stdout and f"resumed from {d / 'checkpoint.pth'} at epoch {len(log)}" in stdout
    wall = json.loads((d / "wall.json").read_text())
    assert wall["resumes"] == 1 and wall["exit_code"] == 0 and wall["wall_s"] > first["wall_s"]
    whole = [json.loads(l) for l in open(tmp_path / "whole" / "gbg_s0" / "log.txt")]
    cut = [json.loads(l) for l in open(d / "log.txt")]
    assert [e["epoch"] for e in cut] == [0, 1, 2]
    for a, b in zip(whole, cut):  # the same epochs as the uninterrupted run, to the last bit
        assert (a["train_loss"], a["test_top1"]) == (b["train_loss"], b["test_top1"])
    assert json.loads((d / "groups.json").read_text())["groups"] == \
        json.loads((tmp_path / "whole" / "gbg_s0" / "groups.json").read_text())["groups"]
    line = json.loads((out / "table.json").read_text())["runs"][0]
    assert line["status"] == "done" and line["resumes"] == 1 and line["wall_s"] == wall["wall_s"]

    # once more: the finished run is kept, not run again
    r = run_repro(tmp_path, *argv, "--out", str(out))
    assert "gbg_s0: finished in an earlier call, kept" in r.stdout and "start gbg_s0" not in r.stdout
    assert json.loads((d / "wall.json").read_text()) == wall


def test_summarize_include_joins_runs_kept_elsewhere(tmp_path):
    """--include: seed 1 kept in another folder joins seed 0's table: the mean row is the one the
    table of both in one folder has (results/cpu_miniature's), the included run is named by its
    path, a later --summarize keeps it, and the paper's Table 6 number stands beside its row."""
    src = ROOT / "results" / "cpu_miniature"
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, run in ((a, "ce_s0"), (b, "ce_s1"), (a, "gbg_s0"), (b, "gbg_s1")):
        shutil.copytree(src / run, folder / run)
    r = run_repro(tmp_path, "--summarize", "--out", str(a), "--include", str(b / "ce_s1"), str(b / "gbg_s1"))
    table = json.loads((a / "table.json").read_text())
    whole = json.loads((src / "table.json").read_text())
    assert table["included"] == ["../b/ce_s1", "../b/gbg_s1"]
    assert [l["run"] for l in table["runs"]] == ["ce_s0", "../b/ce_s1", "gbg_s0", "../b/gbg_s1"]
    assert table["means"] == whole["means"]
    assert "| ../b/ce_s1 | 61.55 |" in r.stdout and "| 71.36 |" in r.stdout and "| 75.53 |" in r.stdout
    again = run_repro(tmp_path, "--summarize", "--out", str(a))
    assert again.stdout == r.stdout and json.loads((a / "table.json").read_text()) == table
    for argv, words in ((["--summarize", "--include", str(tmp_path)], "not a run folder"),
                        (["--summarize", "--include", str(a / "ce_s0")], "already in --out"),
                        (["--include", str(b / "ce_s1")], "use it with --summarize")):
        bad = run_repro(tmp_path, "--out", str(a), *argv, check=False)
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and words in bad.stderr, bad.stderr
    shutil.rmtree(b / "gbg_s1")
    gone = run_repro(tmp_path, "--summarize", "--out", str(a), check=False)
    assert gone.returncode != 0 and "../b/gbg_s1, which is no run folder now" in gone.stderr


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (ROOT / "results").glob("*/table.json")))
def test_summarize_of_a_committed_results_folder_leaves_it_as_it_is(tmp_path, name):
    """README's `--summarize --out results/...` on a clean checkout: the table is printed and not a
    byte of the folder changes (no new call record, no date, no rewrite of an older table.json's
    layout); table.json's modification time stays too."""
    out = tmp_path / name
    shutil.copytree(ROOT / "results" / name, out, ignore=shutil.ignore_patterns("*.pth", "*.png"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    s = run_repro(tmp_path, "--summarize", "--out", str(out))
    assert s.stdout == (ROOT / "results" / name / "table.md").read_text()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    (out / "table.md").unlink()  # a table.md deleted (or edited) is written again from the run folders
    run_repro(tmp_path, "--summarize", "--out", str(out))
    assert (out / "table.md").read_bytes() == before[out / "table.md"][0]
