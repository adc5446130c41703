"""What a run prints and writes for its reader: no nan or None for epochs that were not
evaluated, numbers at a sensible precision, classes by name, the run's time across a resume, and
--help in the order people read it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data_lt  # noqa: E402
import train as T  # noqa: E402

# Two epochs, grouped at once (on a few samples a class), evaluated after the second only.
RUN = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--workers", "0", "--batch-size", "128",
       "--epochs", "2", "--warmup-epochs", "1", "--group-epoch", "0", "--grad-max-per-class", "5", "--eval-every", "2"]
LONG_FLOAT = re.compile(r"\d\.\d{5,}")  # more than 4 decimals: a float printed raw


def python(*argv, timeout=900):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_stopped_and_resumed_run_prints_what_it_did(tmp_path):
    first = python("train.py", *RUN, "--output-dir", tmp_path, "--exit-after-epoch", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    second = python("train.py", *RUN, "--output-dir", tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = first.stdout.splitlines() + second.stdout.splitlines()
    for line in lines:
        assert not re.search(r"\bnan\b|\bNone\b", line), line
        assert not LONG_FLOAT.search(line), line
    assert "2 epochs, batch 128 over 1 process," in first.stdout
    # the epoch that was not evaluated says so; the evaluated one gives two decimals throughout
    assert re.search(r"^epoch 0: train loss \d+\.\d{4}, not evaluated \(--eval-every 2\); 0:\d\d:\d\d elapsed, "
                     r"eta \d+:\d\d:\d\d$", first.stdout, re.M), first.stdout
    assert re.search(r"^epoch 1: test top-1 \d+\.\d\d \(many \d+\.\d\d, medium \d+\.\d\d, few \d+\.\d\d\); "
                     r"0:\d\d:\d\d elapsed$", second.stdout, re.M), second.stdout
    # progress lines: the epoch's ETA and the run's
    progress = [l for l in first.stdout.splitlines() if l.startswith("epoch 0 [")]
    assert progress and all(re.search(r"eta \d+:\d\d:\d\d \(epoch\), run eta \d+:\d\d:\d\d$", l) for l in progress)
    # the grouping pass says what it does, with the number of classes, and how long it took
    before = [l for l in lines if l.startswith("grouping: class gradients of 10 classes")]
    after = [l for l in lines if re.match(r"grouping: class gradients in \d+\.\ds", l)]
    ncut = [l for l in lines if re.match(r"grouping: affinity and NCut of 10 classes into 4 groups in \d+\.\ds$", l)]
    assert len(before) == len(after) == len(ncut) == 1, lines
    assert re.search(r"^groups \(epoch 0\): sizes \[.*\], NCut value \d+\.\d{4}$", first.stdout, re.M)
    # the classes by name, in groups.json and in the printed groups
    names = data_lt.synthetic_names(10)
    groups = json.load(open(tmp_path / "groups.json"))
    assert groups["class_names"] == names
    printed = [l for l in first.stdout.splitlines() if l.startswith("  group ")]
    assert len(printed) == 4
    for i, (line, members) in enumerate(zip(printed, groups["groups"])):
        assert line.startswith(f"  group {i}: ") and line.endswith(", ".join(names[k] for k in members)), line
    # log.txt's time_s goes on counting over the restart, and the checkpoint holds it
    log = [json.loads(l) for l in open(tmp_path / "log.txt")]
    assert [e["epoch"] for e in log] == [0, 1] and 0 < log[0]["time_s"] < log[1]["time_s"]
    assert "test_top1" not in log[0] and log[1]["test_top1"] is not None
    ckpt = T.torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["elapsed_s"] == log[1]["time_s"]


def test_print_helpers():
    assert [T.plural(n, "epoch") for n in (1, 2)] == ["1 epoch", "2 epochs"]
    assert T.plural(1, "class", "classes") == "1 class" and T.plural(3, "class", "classes") == "3 classes"
    assert (T.pct(33.333333333333336), T.pct(None)) == ("33.33", "-")
    assert T.hms(3725.9) == "1:02:05"
    # progress about ten times an epoch unless --print-freq says otherwise
    assert [T.print_every(SimpleNamespace(print_freq=0), n) for n in (1, 8, 95, 1000)] == [1, 1, 10, 100]
    assert T.print_every(SimpleNamespace(print_freq=3), 1000) == 3
    # the epoch line: not evaluated, or evaluated with an empty shot group
    clock = T.RunClock(epochs=3)
    clock.start_epoch(0)
    clock.end_epoch()
    args = SimpleNamespace(eval_every=2, epochs=3)
    line = T.epoch_line(0, {"train_loss": 1.23456789}, clock, args)
    assert re.fullmatch(r"epoch 0: train loss 1\.2346, not evaluated \(--eval-every 2\); 0:00:\d\d elapsed, "
                        r"eta 0:00:\d\d", line), line
    line = T.epoch_line(2, {"train_loss": 1.0, "test_top1": 50.0, "test_many": 66.66666666666667, "test_medium": None,
                            "test_few": 0.0}, clock, args)
    assert line.startswith("epoch 2: test top-1 50.00 (many 66.67, medium -, few 0.00); ") and "eta" not in line


def test_eta_prices_gbg_epochs_and_the_grouping_apart_from_the_warm_up():
    """issue #37's run, on a fake clock: 5 warm-up epochs of 60 s, a grouping of 120 s, GBG epochs
    of 300 s (8 epochs). At the end of the warm-up the run's ETA is not given as three warm-up
    epochs (it waits for the first GBG epoch); inside the first GBG epoch it counts the later ones
    at this epoch's pace; after it, exactly the epochs left at 300 s; the progress line's run ETA
    and the next epoch line's agree. Regroupings to come are counted at the grouping's time."""
    now = [0.0]
    args = SimpleNamespace(grouping="gbg", epochs=8, group_epoch=5, regroup_every=0, eval_every=1)
    clock = T.run_clock(args, 0.0)
    clock.now = lambda: now[0]
    clock.t0 = 0.0

    def epoch(e, seconds, grouping=0.0):
        clock.start_epoch(e)
        if grouping:
            now[0] += grouping
            clock.grouped(grouping)
        now[0] += seconds
        clock.end_epoch()
    for e in range(5):
        epoch(e, 60.0)
        assert clock.eta(e, 0.0) is None  # GBG epochs to come, none timed
    assert T.epoch_line(4, {"train_loss": 1.0}, clock, args).endswith("eta after the first GBG epoch")
    clock.start_epoch(5)
    now[0] += 120.0
    clock.grouped(120.0)
    now[0] += 150.0  # half of epoch 5's steps: the progress line's estimate of the epoch is 300 s
    assert clock.eta(5, 150.0, 300.0) == 150.0 + 2 * 300.0
    assert clock.eta_text(5, 150.0, 300.0) == T.hms(750.0)
    now[0] += 150.0
    clock.end_epoch()
    assert clock.eta(5, 0.0) == 2 * 300.0 and T.epoch_line(5, {"train_loss": 1.0}, clock, args).endswith("eta 0:10:00")
    clock.start_epoch(6)
    now[0] += 150.0
    assert clock.eta(6, 150.0, 300.0) == 150.0 + 300.0  # the same pace as the epoch line said
    assert clock.elapsed() == 5 * 60.0 + 120.0 + 300.0 + 150.0
    # regrouping every 2 epochs from epoch 2 of 7: epochs 4 and 6 will group again
    args = SimpleNamespace(grouping="gbg", epochs=7, group_epoch=2, regroup_every=2)
    clock = T.run_clock(args, 0.0)
    clock.now, now[0] = (lambda: now[0]), 0.0
    for e, (seconds, grouping) in enumerate([(10.0, 0), (10.0, 0), (50.0, 20.0)]):
        epoch(e, seconds, grouping)
    assert clock.eta(2, 0.0) == 4 * 50.0 + 2 * 20.0
    # no grouping: every epoch one kind, timed from the first
    clock = T.run_clock(SimpleNamespace(grouping="none", epochs=3), 0.0)
    clock.now, now[0] = (lambda: now[0]), 0.0
    epoch(0, 30.0)
    assert clock.eta(0, 0.0) == 60.0 and clock.eta(0, 5.0, 30.0) == 65.0


def test_elapsed_time_of_a_resumed_run(tmp_path):
    """The checkpoint's elapsed_s; a checkpoint from before it: the last time_s of log.txt."""
    assert T.elapsed_before(None, tmp_path / "log.txt", 0) == 0.0
    assert T.elapsed_before({"elapsed_s": 12.5}, tmp_path / "log.txt", 3) == 12.5
    (tmp_path / "log.txt").write_text("".join(json.dumps({"epoch": e, "time_s": 10.0 * (e + 1)}) + "\n"
                                              for e in range(4)))
    assert T.elapsed_before({}, tmp_path / "log.txt", 2) == 20.0


def test_class_names_of_the_data_sets(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                data_lt.Image.new("RGB", (8, 8)).save(tmp_path / split / name / f"{i}.png")
    assert data_lt.build_data("folder-lt", str(tmp_path), imb_factor=1).class_names == ["cat", "dog"]
    samples = [("train/n01440764/a.JPEG", 0, 1), ("train/n01443537/b.JPEG", 1, 2)]
    assert data_lt.folder_names(samples, 3) == ["n01440764", "n01443537", "2"]


def test_help_shows_what_runs_and_the_most_used_flags_first():
    r = python("train.py", "--help", timeout=300)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("usage: python train.py ")
    order = ["--dataset", "--data-root", "--arch", "--loss", "--epochs", "--batch-size", "--lr", "--output-dir",
             "--grouping", "--moo", "--num-groups", "--device", "--amp"]
    at = [text.index(f"\n  {flag} ") for flag in order]
    assert at == sorted(at) and at[-1] < text.index("\ndata:\n") < text.index("\nrun:\n")
    flat = " ".join(text.split())  # argparse wraps the help text
    # the recipe's values, as fill_defaults fills them, read from the same table
    lr = T.RECIPES
    assert f"(default: {lr['inat2018']['lr']:g} for inat2018, {lr['cifar']['lr']:g} otherwise; " in flat
    assert (f"(default: {lr['imagenet-lt']['epochs']} for imagenet-lt, {lr['inat2018']['epochs']} for inat2018, "
            f"{lr['cifar']['epochs']} otherwise; --preset release: {T.RELEASE['epochs']})") in flat
    assert "(default: 256)" in flat and "(default: ./data;" in flat
    # every data set's default, as --help states it, is what fill_defaults gives
    for ds in T.DATASETS:
        args = T.get_args_parser().parse_args(["--dataset", ds])
        args.world_size = 1
        T.fill_defaults(args)
        for key in ("arch", "epochs", "lr", "wd", "schedule", "warmup_epochs", "loss", "normalize", "imb_factor"):
            stated = T.default_help(key).split("(default: ")[1].split("; --preset")[0].rstrip(")")
            per_dataset = {}
            for part in stated.split(", "):
                value, _, which = part.partition(" for ")
                value = value.removesuffix(" otherwise")
                for name in (which.split(" and ") if which else T.DATASETS):
                    per_dataset.setdefault(name, value)
            value = getattr(args, key)
            assert per_dataset[ds] == (f"{value:g}" if isinstance(value, float) else str(value)), (ds, key, stated)


def test_help_gives_every_flags_default():
    """Every flag that takes a value says its default in --help (an on/off flag is off unless given):
    --seed's 0 went unsaid, as 0 == False. folder-lt's layout is said there, not only in README."""
    parser = T.get_args_parser(add_help=True)
    formatter = parser._get_formatter()
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and a.nargs != 0
              and "default" not in formatter._expand_help(a)]
    assert silent == [], silent
    text = " ".join(parser.format_help().split())
    for flag, default in (("--seed", "0"), ("--data-seed", "0"), ("--momentum", "0.9")):
        shown = re.search(re.escape(flag) + r" [A-Z_]+ .*?\(default: ([^)]*)\)", text).group(1)
        assert shown == default == str(parser.get_default(flag[2:].replace("-", "_"))), (flag, shown)
    assert "DATA_ROOT/train/<class>/*, DATA_ROOT/test/<class>/*" in text


def test_submit_help_shows_the_cluster_flags_first():
    r = python("slurm/submit.py", "--help", timeout=300)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("usage: python slurm/submit.py ")
    at = [text.index(f"\n  {flag} ") for flag in ("--partition", "--nodes", "--gpus-per-node", "--timeout", "--job-dir")]
    assert at == sorted(at) and at[-1] < text.index("\nmost used:\n") < text.index("\n  --dataset ")
