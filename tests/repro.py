#!/usr/bin/env python
"""The paper's CIFAR-10-LT comparisons in one command: the chosen rows of ROWS (Tables 5 and 6),
each one train.py run on the CIFAR-10 JPEG copy made long-tailed (IF 100), side by side, then one
table of the results.

    python tests/repro.py --runs ce,gbg --budget 540 --out "$OUT"        # one GPU: ResNet-32, 200 epochs, bf16
    python tests/repro.py --runs bcl,bcl_gbg --budget 540 --out "$OUT"   # the BCL rows of Table 6
    python tests/repro.py --device cpu --arch resnet8 --amp --runs ce gbg --seeds 0 1 --jobs 2 --out runs/mini
    python tests/repro.py --summarize --out runs/mini                    # the table again, from the run folders
    python tests/repro.py --summarize --out runs/t6 --include runs/mini/bcl_s0  # a run kept elsewhere joins it

Data: the CIFAR-10 JPEG copy in ImageFolder layout (train/<class>/*.jpg, test/<class>/*.jpg) in
--data (default .data/cifar10 of the checkout); when --data/train is missing, the tarball --tarball
(default .data/cifar10-jpg.tar.gz) is unpacked there first. With --dataset cifar10-lt, torchvision's
official CIFAR-10 python files in --data (default data/, holding cifar-10-batches-py/) instead, so
that the same table can be made on both (tests/make_cifar_jpeg.py writes the JPEG copy from them).

Every run: train.py --dataset folder-lt (or --dataset) --imb-factor 100, batch 256, --workers 0, the
row's flags, then --extra. Its folder OUT/<row>_s<seed> holds log.txt, results.json, groups.json, stdout.txt
(train.py's stdout and stderr), wall.json ({"run", "wall_s", "exit_code", "flags", "resumes",
"commit", "command"}: the row's flags and --extra; wall_s summed over every call that ran it,
resumes the number of those calls after the first, commit the checkout's git commit, command the
whole train.py command) and, for a run that did not finish, stop.json (why). The checkpoints of
finished runs (exit 0 and results.json) are deleted; those of other runs are kept. A checkpoint is
checkpoint.pth or checkpoint.prev.pth (train.py's save_atomic renames the one into the other
before it puts the new file in place, and resumes from either).

Calling it again with the same --out goes on where the last call ended, so that runs longer than a
session (a CPU at the paper's schedule) cross sessions: a finished run (results.json, exit 0) is
kept and not run again; an unfinished one (a checkpoint, and a process that was stopped: stopped,
cut, killed with the session, or --exit-after-epoch in --extra) is resumed from its checkpoint by
train.py with the same command, its stdout.txt appended to. A run that failed by itself (train.py
exited non-zero, not by a signal: a one-line error such as a divergence or a refused resume, or a
crash) is "failed (exit N, checkpoint kept)": it counts as a failure (exit 1, its stdout's last
line printed) and is not run again by later calls, which would most likely fail the same way; to
resume it once the cause is fixed, delete its wall.json, or delete its folder to start it over. A
run that failed before its first checkpoint has nothing to keep: the next call starts it again.
Any other run folder is emptied and the run starts from zero. wall.json is rewritten while a run
goes, so a call killed outright still leaves the wall time it had spent. A folder that a call
would keep or resume, or a folder of the same row with another seed, that an earlier call made with
other settings (wall.json's command: --epochs, --arch, --device, --extra, the row's flags; not the
interpreter, --data, --out or --amp, with which train.py resumes) is refused in one line: give
that call another --out; so a row's mean is over runs of one setting. Folders from before wall.json recorded the
command are taken as they are. Run every call of a set of runs from the same commit (wall.json
records it). OUT/table.json and OUT/table.md have one record per call of repro.py on OUT
(machine, command, wall time, date; a table.json from before the list gives its single one), one
line per run folder found in OUT, with the epochs it has kept (its checkpoint's epoch + 1, else
log.txt's distinct epochs), and for every row with two or more finished seeds one line of
mean +- half the range (max - min) / 2 over those seeds: with two seeds, both lie on its bounds.

Order and priority: the runs are the rows of --runs for the first seed, then for the next seed,
and so on; they start in that order, --jobs at a time, and that order is also their priority.

Budget (--budget S: the whole script's wall-clock seconds, unpacking included). The runs must end
by DEADLINE = start + S - RESERVE_S (the rest is for stopping runs and writing the table). Every
POLL_S seconds, each running run's pace (seconds per epoch) is the mean of its last RECENT usable
epoch times, an epoch's time being the step of log.txt's time_s from the epoch before. Usable: not
epoch 0 (the first steps' one-off costs); once groups.json exists, only epochs after the grouping
epoch (that epoch holds the grouping, and the MGDA epochs after it are slower than the warm-up's);
and only epochs begun after the set of running runs last changed (a start, an end, a stop), since
the others' pace changes with it. A pace is final once measured, for a grouping row (--grouping
other than none) after its grouping; before, it is a lower bound, and a run not measured yet
counts as needing no time. From the paces and the epochs left, runs_to_stop projects when the runs
end: on a GPU, or CPU runs with more threads than cores, they share the device, and each run that
ends is assumed to speed the rest up in proportion (processor sharing); CPU runs on cores of their
own keep their pace. In --runs order, a run is kept when it and the runs kept before it all end by
DEADLINE; one that does not fit is stopped ("stopped" in stop.json and the table) once the paces
of the runs kept before it are final (until then, one of them may turn out not to fit and make
room). Every assumption errs towards earlier ends, so a stopped run could not have finished:
fewer rows rather than a cut-off run. The check repeats as epochs come in. Where the model is too
hopeful (a GPU the runs do not saturate), a run still going at DEADLINE is ended there ("cut"),
and runs not started by then are "not started". None of these is reported as a result; the table
keeps their epochs and wall time.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py and .data/ live here

# The rows: train.py flags on top of the protocol of run_command. Paper numbers: CIFAR-10-LT IF 100,
# ResNet-32, top-1 (Li et al., AAAI 2024). Checked against train.py's own defaults in
# tests/test_repro.py::test_rows_mean_what_their_names_say.
ROWS = {
    # Table 6: CE, 71.36.
    "ce": "--grouping none --moo none --sampler random",
    # Table 6: CE+GBG+MOO, 75.53 (train.py's defaults: GBG groups, MGDA over them, GAC batches).
    "gbg": "--grouping gbg --moo mgda --sampler gac",
    # Table 6's GBG-alone ablation on CE (the paper gives it on BCL only, "BCL+GBG" 84.20): GBG
    # groups and GAC batches, the group losses averaged with equal weights instead of MGDA.
    "avg": "--grouping gbg --moo none --sampler gac",
    # Table 6's MOO-alone ablation on CE (the paper gives it on BCL only, "BCL+MOO" 74.58): every
    # class its own objective, on plain shuffled batches, where tail classes are often absent.
    "moo": "--grouping none --moo mgda --sampler random",
    # Table 5's other grouping rules (the paper's Table 5 is on ImageNet-LT): 4 random groups (drawn
    # from --seed; the paper averages several seeds), Li et al. 2020's count bins as the paper cites
    # them (3 groups on CIFAR-10-LT IF 100), and 4 groups of classes with similar training counts
    # (ours, any G); MGDA and GAC as in "gbg".
    "random": "--grouping random --moo mgda --sampler gac",
    "count_bins": "--grouping count_bins --moo mgda --sampler gac",
    "count": "--grouping count --moo mgda --sampler gac",
    # Table 6 with BCL as the base method: BCL 84.07, BCL+GBG 84.20, BCL+MOO 74.58, BCL+GBG+MOO 85.05.
    "bcl": "--loss bcl --grouping none --moo none --sampler random",
    "bcl_avg": "--loss bcl --grouping gbg --moo none --sampler gac",
    "bcl_moo": "--loss bcl --grouping none --moo mgda --sampler random",
    "bcl_gbg": "--loss bcl --grouping gbg --moo mgda --sampler gac",
    # No paper row: the authors' released CIFAR script, i.e. train.py's --preset release (RELEASE in
    # train.py) spelled out, since that preset accepts only --dataset cifar10-lt / cifar100-lt: BCL,
    # shuffled batches without a sampler, group loss = mean over the group's samples with plain CE,
    # MGDA on loss+-normalised gradients whose alpha weights the raw losses, Gram over the backbone,
    # grouping the initial model with eval-mode BatchNorm, labels by cluster_qr. The protocol's IF 100 and --epochs replace
    # the release's IF 50 and 300 epochs; the lr drops follow --epochs like every row's (160 and
    # 180 at 200 epochs, the release's).
    "release": "--loss bcl --grouping gbg --moo mgda --sampler random --group-loss sample --bcl-group-loss ce "
               "--normalize loss+ --moo-update raw --moo-gram backbone --no-recalibrate-bn --group-epoch 0 "
               "--ncut-assign cluster_qr",
    # No paper row: the release's grouping and MGDA rules (as in "release") on plain CE instead of
    # BCL, beside "ce" and "gbg": the CE rows of Table 6 with the authors' step instead of ours.
    "release_ce": "--loss ce --grouping gbg --moo mgda --sampler random --group-loss sample --normalize loss+ "
                  "--moo-update raw --moo-gram backbone --no-recalibrate-bn --group-epoch 0 --ncut-assign cluster_qr",
    # Issue #35: where CE+GBG+MOO's gain comes from, and how our recipe sits against the literature's.
    # The re-balancing alone: CE whose batch loss is the mean of its classes' mean losses (Eq. 10's
    # class means with every class its own group, equal weights), no groups, no MGDA, plain batches.
    "cb": "--grouping none --moo none --sampler random --class-balanced",
    # CE+GBG+MOO with the release's group loss, the mean over the group's samples (GBG_v1
    # cifar_Group_full.py l.303): what Eq. 10's class means add to "gbg".
    "gbg_sample": "--grouping gbg --moo mgda --sampler gac --group-loss sample",
    # The augmentation alone: CE on the release's CIFAR view, crop-flip + AutoAugment CIFAR10 policy +
    # Cutout 16 px (GBG_v1 cifar_Group_full.py l.168-176), against "ce"'s crop and flip.
    "ce_aug": "--grouping none --moo none --sampler random --augment release",
    # The method's gain when both sides have the release's augmentation: "gbg" on that view, against "ce_aug".
    "gbg_aug": "--grouping gbg --moo mgda --sampler gac --augment release",
    # Our CE recipe against the literature's: LDAM-DRW's (kaidic/LDAM-DRW cifar_train.py: batch 128 l.47,
    # wd 2e-4 l.54, lr x0.01 after epoch 160 and x0.0001 after 180 in adjust_learning_rate l.366-378),
    # whose ERM row (70.36 on CIFAR-10 IF 100) is the one the papers copy. The drops follow --epochs
    # (80 % and 90 %: 160 and 180 at 200), like every row's. The 5 warm-up epochs stay ours (linear over
    # the steps; LDAM's is lr x (e + 1) / 5 per epoch), and so do its plain shuffled batches and CE.
    "ce_ldam": "--grouping none --moo none --sampler random --batch-size 128 --wd 2e-4 --lr-gamma 0.01",
    # No paper row: the paper's future work (its conclusion), adjusting the groups during training.
    # "gbg" regrouped every 20 epochs (at 25, 45, ..., 185 with the grouping at 5), into the same G.
    "regroup": "--grouping gbg --moo mgda --sampler gac --regroup-every 20",
}
# The paper's top-1 of the rows it has: Table 6 (CIFAR-10-LT IF 100, ResNet-32); the tables print it
# beside ours, whatever --arch ran.
PAPER_TOP1 = {"ce": 71.36, "gbg": 75.53, "bcl": 84.07, "bcl_avg": 84.20, "bcl_moo": 74.58, "bcl_gbg": 85.05}
# --dataset: the default --data of each (see --data)
DATA_DEFAULT = {"folder-lt": ROOT / ".data" / "cifar10", "cifar10-lt": ROOT / "data"}
POLL_S = 1.0      # how often the runs are checked: reading a few small log files
RESERVE_S = 10.0  # of --budget, kept for stopping the last runs and writing the table
RECENT = 3        # epoch times averaged for a pace: recent enough to follow a change of pace
STOP_WAIT_S = 10  # a stopped run gets SIGTERM, then SIGKILL after this many seconds
WALL_EVERY_S = 30  # how often a running run's wall.json is rewritten


def fail(message):
    sys.exit(f"repro.py: error: {message}")


def get_args_parser():
    p = argparse.ArgumentParser("repro.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["ce", "gbg"],
                   help=f"rows to run, comma or space separated, in priority order (default: ce gbg); any of "
                        f"{', '.join(ROWS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--arch", default="resnet32", help="train.py --arch (resnet32: the paper's Table 6)")
    p.add_argument("--epochs", type=int, default=200, help="200: the paper's schedule (LDAM-DRW's)")
    p.add_argument("--seeds", nargs="+", default=["0"], help="training seeds, comma or space separated (default 0)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side (default: all of them on cuda, sharing the GPU; 1 on cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each run (default: 1 on cpu, as this project's CPU runs; on cuda "
                        "the cores divided among the runs)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="train.py --amp, bf16 autocast (default: on for cuda, off for cpu)")
    p.add_argument("--budget", type=float, default=None,
                   help="wall-clock seconds for the whole script; runs that cannot finish in it are stopped, "
                        "lowest priority first (see the top of this file)")
    p.add_argument("--out", default=str(ROOT / "runs" / "repro"), help="output folder (default: runs/repro)")
    p.add_argument("--dataset", default="folder-lt", choices=list(DATA_DEFAULT),
                   help="folder-lt: the CIFAR-10 JPEG copy (the default, what results/ used); cifar10-lt: "
                        "torchvision's official CIFAR-10 python files, for the same table on both")
    p.add_argument("--data", default=None,
                   help="folder-lt: the unpacked CIFAR-10 JPEG copy, holding train/ and test/ (default: "
                        ".data/cifar10); cifar10-lt: the torchvision root holding cifar-10-batches-py/ "
                        "(default: data, train.py's --data-root)")
    p.add_argument("--tarball", default=str(ROOT / ".data" / "cifar10-jpg.tar.gz"),
                   help="unpacked into --data when --data/train is missing (default: .data/cifar10-jpg.tar.gz)")
    p.add_argument("--extra", default="",
                   help='more train.py flags for every run, as one string: --extra "--moo-grad last" (one flag '
                        'alone: --extra=--compile)')
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter that runs train.py (default: the one running this script)")
    p.add_argument("--gpu-check", action=argparse.BooleanOptionalAction, default=True,
                   help="on cuda: run tests/gpu_check.py into OUT/gpu_check first, and with --budget and --arch "
                        "resnet32 (what it measures) start only the runs its images/s say can end in time (default: on)")
    p.add_argument("--summarize", action="store_true",
                   help="only rebuild OUT/table.json and table.md from the run folders in --out")
    p.add_argument("--include", nargs="+", default=None, metavar="DIR",
                   help="with --summarize: run folders kept elsewhere (another --out's) that join this table, e.g. "
                        "a seed or a row run before; table.json records them relative to --out, and later calls "
                        "keep them")
    return p


def split_list(values):
    """["ce,gbg", "moo"] -> ["ce", "gbg", "moo"]"""
    return [v for value in values for v in re.split(r"[,\s]+", value) if v]


def check_args(args):
    """Fill the defaults that depend on --device and check the flags: one line per problem."""
    args.runs = split_list(args.runs)
    unknown = [r for r in args.runs if r not in ROWS]
    if unknown or not args.runs:
        fail(f"--runs: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    if len(set(args.runs)) < len(args.runs):
        fail(f"--runs lists a row twice ({' '.join(args.runs)}); give each row once")
    try:
        args.seeds = [int(s) for s in split_list(args.seeds)]
    except ValueError:
        fail(f"--seeds {' '.join(args.seeds)}: give whole numbers, e.g. --seeds 0,1")
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        fail(f"--seeds {args.seeds}: give distinct non-negative whole numbers, e.g. --seeds 0,1")
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as e:
        fail(f"--extra: {e}; quote it as one string, e.g. --extra \"--moo-grad last\"")
    n = len(args.runs) * len(args.seeds)
    if args.jobs is not None and args.jobs < 1:
        fail(f"--jobs {args.jobs} must be at least 1")
    if args.budget is not None and not math.isfinite(args.budget):
        fail(f"--budget {args.budget}: give a number of seconds")
    args.jobs = args.jobs if args.jobs is not None else (n if args.device == "cuda" else 1)
    args.threads = args.threads if args.threads is not None else (
        1 if args.device == "cpu" else max(1, (os.cpu_count() or 1) // min(args.jobs, n)))
    args.amp = args.amp if args.amp is not None else args.device == "cuda"
    for name, value, least in (("--epochs", args.epochs, 1), ("--jobs", args.jobs, 1), ("--threads", args.threads, 1)):
        if value < least:
            fail(f"{name} {value} must be at least {least}")
    if args.budget is not None and args.budget <= RESERVE_S:
        fail(f"--budget {args.budget:g} must be more than {RESERVE_S:g} seconds (kept for stopping runs and the table)")
    args.data = args.data if args.data is not None else DATA_DEFAULT[args.dataset]
    args.out, args.data, args.tarball = (Path(p).resolve() for p in (args.out, args.data, args.tarball))
    if shutil.which(args.python) is None:
        fail(f"--python {args.python} is not an executable; give the interpreter that has torch")
    if os.sep in args.python:  # the runs start in the checkout; abspath keeps a venv's symlink as it is
        args.python = os.path.abspath(args.python)
    return args


# --- Data -----------------------------------------------------------------------------------------
def ensure_data(data, tarball, dataset="folder-lt"):
    """--data/train present, or unpack --tarball into --data (through a side folder, so that an
    interrupted unpack leaves no half copy behind). cifar10-lt: torchvision's python files present
    in --data (no download here: the runs would each try one)."""
    data, tarball = Path(data), Path(tarball)
    if dataset == "cifar10-lt":
        if not all((data / "cifar-10-batches-py" / f).is_file() for f in ("data_batch_1", "test_batch")):
            fail(f"no data: {data / 'cifar-10-batches-py'} lacks the CIFAR-10 python files; give --data the "
                 f"folder torchvision.datasets.CIFAR10(root, download=True) filled")
        return
    if (data / "train").is_dir():
        return
    if not tarball.is_file():
        fail(f"no data: {data / 'train'} is missing and so is {tarball}; put the CIFAR-10 JPEG tarball there "
             f"(results/README.md, 'Reproducing the paper's CIFAR rows') or give --data / --tarball")
    if data.exists() and any(data.iterdir()):
        fail(f"{data} has no train/ folder but is not empty; remove it, or give --data the folder holding train/")
    print(f"unpacking {tarball} into {data}", flush=True)
    side = data.with_name(data.name + ".partial")
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(side, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(side, ignore_errors=True)
        fail(f"cannot unpack {tarball}: {e}")
    if not (side / "train").is_dir():
        shutil.rmtree(side, ignore_errors=True)
        fail(f"{tarball} holds no train/ folder at its top; expected train/<class>/*.jpg and test/<class>/*.jpg")
    if data.exists():
        data.rmdir()  # empty, checked above
    side.rename(data)


# --- Runs -----------------------------------------------------------------------------------------
def run_name(row, seed):
    return f"{row}_s{seed}"


def row_flags(row, extra):
    """The flags that make the run what it is: the row's, then --extra (later flags win in train.py)."""
    return shlex.split(ROWS[row]) + list(extra)


def run_command(args, row, seed, out_dir):
    # The protocol of Table 6: CIFAR-10-LT IF 100, batch 256 (train.py's default: the release's and
    # BCL's). --workers 0: the small JPEGs (or the official files) are held as one tensor and augmented
    # on the device, so workers have nothing to do. --print-freq 1000: one progress line per epoch.
    cmd = [args.python, str(ROOT / "train.py"), "--dataset", args.dataset, "--data-root", str(args.data),
           "--imb-factor", "100", "--arch", args.arch, "--epochs", str(args.epochs), "--batch-size", "256",
           "--device", args.device]
    cmd += ["--amp"] if args.amp else []
    cmd += ["--workers", "0", "--print-freq", "1000", "--seed", str(seed), "--output-dir", str(out_dir)]
    return cmd + row_flags(row, args.extra)


def flag_value(flags, name, default):
    """The value train.py's argparse takes for --name from this list (the last one given wins)."""
    value = default
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def read_log(path):
    """log.txt's complete JSON lines (a line being written is skipped)."""
    lines = []
    try:
        text = Path(path).read_text()
    except OSError:
        return lines
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def epoch_times(log, since, grouped_at):
    """The epoch times that measure a run's pace now (see the top of this file): the time of each
    logged epoch e >= max(since, 1) whose epoch e - 1 is logged too, after grouped_at if given.
    log: [(epoch, time_s)], time_s counting from the start of the run's training."""
    t = dict(log)
    return [t[e] - t[e - 1] for e in sorted(t)
            if e >= max(since, 1) and e - 1 in t and (grouped_at is None or e > grouped_at)]


def pace(log, since, grouped_at):
    """Seconds per epoch: the mean of the last RECENT usable epoch times, or None while there is none."""
    times = epoch_times(log, since, grouped_at)[-RECENT:]
    return sum(times) / len(times) if times else None


def shared_ends(works, now):
    """When runs that share one device equally end (processor sharing): works[i] is the device
    time run i still needs with the device to itself. The smallest ends first, at now + n * its
    work; each end shares the device among fewer runs; the last ends at now + sum(works)."""
    ends, t, done = [None] * len(works), now, 0.0
    for k, i in enumerate(sorted(range(len(works)), key=works.__getitem__)):
        t += (works[i] - done) * (len(works) - k)
        done = works[i]
        ends[i] = t
    return ends


def runs_to_stop(left, paces, final, now, deadline, shared):
    """Indices of the running runs to stop, given in priority order with their epochs left, paces
    (seconds per epoch, measured with all of them running; None: not measured yet, counted as 0)
    and whether each pace is final (else a lower bound: a grouping row before its grouping, or not
    measured). In that order, a run is kept when it and the runs kept before it all end by the
    deadline. A run that does not fit is stopped when the runs kept before it are final; else it
    is kept for now, since one of those may yet be stopped and make room. shared: the runs share
    one device equally, so whenever one ends the rest speed up in proportion (optimistic where
    they do not saturate it); else each has cores of its own and keeps its pace. Either way the
    ends are the earliest the runs can make, so a stopped run could not have finished."""
    secs = [n * (p or 0.0) for n, p in zip(left, paces)]  # at the pace measured with all running
    kept, stop = [], []
    for i in range(len(left)):
        ends = (shared_ends([secs[j] / len(left) for j in kept + [i]], now) if shared
                else [now + secs[j] for j in kept + [i]])
        if max(ends) > deadline and all(final[j] for j in kept):
            stop.append(i)
        else:
            kept.append(i)
    return stop


# train.py's save_atomic renames checkpoint.pth to checkpoint.prev.pth before it renames the new
# file into place, and resumes from checkpoint.prev.pth when checkpoint.pth is missing: a run
# killed between the two renames has only the .prev one, and it still resumes.
CHECKPOINTS = ("checkpoint.pth", "checkpoint.prev.pth")


def has_checkpoint(folder):
    return any((Path(folder) / name).exists() for name in CHECKPOINTS)


def epochs_done(folder, log=None):
    """The epochs a run has kept: its checkpoint's epoch + 1 (log.txt gets an epoch's line before
    the checkpoint is saved, so a run killed in between logged one epoch more than it kept), else
    the distinct epochs of log.txt (an epoch logged again after a resume counts once)."""
    for name in CHECKPOINTS:
        if (Path(folder) / name).exists():
            try:
                import torch  # only here: the table of runs without checkpoints needs no torch
                return int(torch.load(Path(folder) / name, map_location="cpu", weights_only=False,
                                      mmap=True)["epoch"]) + 1
            except Exception:  # unreadable (cut short), or torch missing: the next file, then the log
                continue
    log = read_log(Path(folder) / "log.txt") if log is None else log
    return len({e["epoch"] for e in log if "epoch" in e})


def stopped(exit_code):
    """The run's process was stopped from outside (None: still going when its call was killed;
    killed by a signal: negative; 130, 137, 143: train.py's exit on SIGINT, SIGKILL, SIGTERM),
    as opposed to an exit of its own (0, or 1 for train.py's one-line errors and crashes)."""
    return exit_code is None or exit_code < 0 or exit_code in (130, 137, 143)


def finished(folder):
    """A run that ended by itself in an earlier call: its results, exit 0, no checkpoint left."""
    wall = read_json(folder / "wall.json") or {}
    return (folder / "results.json").exists() and wall.get("exit_code") == 0 and not has_checkpoint(folder)


def failed_with_checkpoint(folder):
    """A run that ended with an error of its own in an earlier call (train.py's exit 1: diverged,
    a resume refused because the flags differ, a crash) and kept a checkpoint: not resumed again
    by itself, since the same command would most likely fail the same way."""
    wall = read_json(folder / "wall.json") or {}
    return has_checkpoint(folder) and "exit_code" in wall and not stopped(wall["exit_code"]) and \
        wall["exit_code"] != 0


def git_commit():
    """The checkout's commit, with '+changes' when tracked files differ from it; None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def start_run(args, run):
    """Start the run, or resume it when its folder holds a checkpoint of an earlier call."""
    out = run["dir"]
    earlier = (read_json(out / "wall.json") or {}) if has_checkpoint(out) else None
    if earlier is None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    else:
        (out / "stop.json").unlink(missing_ok=True)
    run["wall_before"] = float(earlier.get("wall_s") or 0.0) if earlier is not None else 0.0
    run["resumes"] = int(earlier.get("resumes") or 0) + 1 if earlier is not None else 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(out / "stdout.txt", "a" if earlier is not None else "w") as f:
        if earlier is not None:
            f.write(f"--- repro.py: resumed ({run['resumes']}) at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
            f.flush()
        # a session of its own, so that a stop reaches DataLoader workers that --extra may ask for
        run["proc"] = subprocess.Popen(run["command"], stdout=f,
                                       stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    run["t0"] = time.time()
    run["since"] = 1
    write_wall(run)
    return earlier is not None


def settings(command):
    """A train.py command as its '--flag value' items, without what does not change the run: the
    interpreter, train.py's path, --data-root and --output-dir (a moved checkout, data or --out),
    and --amp (train.py resumes a run with or without it: a run begun on a machine with fast bf16
    can end on one without; each call's command stays in table.json's calls)."""
    items = []
    for token in command[2:]:
        if token.startswith("--") or not items:
            items.append(token)
        else:
            items[-1] += " " + token
    return [i for i in items if i.split(" ", 1)[0] not in ("--data-root", "--output-dir", "--amp")]


def row_settings(settings_items):
    """settings() less the seed: what the seeds of one row share."""
    return [i for i in settings_items if i.split(" ", 1)[0] != "--seed"]


def recorded_settings(folder):
    """row_settings of the command wall.json recorded, or None (a folder from before it did)."""
    command = (read_json(folder / "wall.json") or {}).get("command")
    return row_settings(settings(command)) if command else None


def check_settings(args):
    """One line and no run when a folder this call would keep or resume (finished, or with a
    checkpoint), or a kept folder of one of this call's rows with another seed, was made by an
    earlier call with other settings (--epochs, --arch, --device, --extra, the row's flags:
    wall.json's command), rather than mixing the two in one table or one row's mean. Folders from
    before wall.json recorded the command are accepted as they are."""
    out = Path(args.out)
    for row in args.runs:
        new = row_settings(settings(run_command(args, row, args.seeds[0], out / run_name(row, args.seeds[0]))))
        others = [d for d in sorted(out.glob(f"{row}_s*")) if re.fullmatch(rf"{re.escape(row)}_s\d+", d.name)] \
            if out.is_dir() else []
        for folder in others:
            old = recorded_settings(folder)
            if old is None or not (finished(folder) or has_checkpoint(folder)):
                continue
            if old != new:
                was, now = settings_difference(old, new)
                difference = f"{was}; this call: {now}" if (was, now) != ("no other flag",) * 2 else \
                    "the same flags in another order"
                fail(f"{folder} was made with other train.py settings ({difference}); give this call another "
                     f"--out, or the settings of that folder's call")


def settings_difference(old, new):
    """The items only `old` has and those only `new` has, each as one string."""
    return (" ".join(i for i in old if i not in new) or "no other flag",
            " ".join(i for i in new if i not in old) or "no other flag")


def check_included(lines, local, out):
    """--include: no run of a row and seed this table holds already, and the settings of the
    row's other runs (wall.json's commands), so that a row's mean is over seeds of one setting."""
    seen = {(l["row"], l["seed"]): l["run"] for l in local}
    held = [dict(l, settings=recorded_settings(out / l["run"])) for l in local]  # the runs so far
    for l, folder in lines:
        if (l["row"], l["seed"]) in seen:
            fail(f"--include {folder}: {seen[l['row'], l['seed']]} is {l['row']} with seed {l['seed']} already; "
                 f"include another seed or row")
        seen[l["row"], l["seed"]] = l["run"]
        mine = recorded_settings(folder)
        held.append(dict(l, settings=mine))
        for other in [o for o in held[:-1] if o["row"] == l["row"]]:
            theirs = other.get("settings")
            if mine is not None and theirs is not None and mine != theirs:
                was, now = settings_difference(theirs, mine)
                fail(f"--include {folder}: made with other train.py settings than {other['run']} ({now}; "
                     f"{other['run']}: {was}); a row's mean is over seeds of one setting")


def write_wall(run):
    """wall.json: the wall time of every call that ran this run, this one's so far included."""
    wall = run["wall_before"] + time.time() - run["t0"]
    (run["dir"] / "wall.json").write_text(json.dumps(
        {"run": str(run["dir"]), "wall_s": wall, "exit_code": run["proc"].poll(), "flags": run["flags"],
         "resumes": run["resumes"], "commit": run["commit"], "command": run["command"]}))
    return wall


def observe(run):
    """(log as [(epoch, time_s)], grouping epoch or None) of a running run, from its folder."""
    log = [(e["epoch"], e["time_s"]) for e in read_log(run["dir"] / "log.txt") if "time_s" in e]
    groups = read_json(run["dir"] / "groups.json")  # written by grouping rows at their grouping epoch
    return log, groups.get("epoch") if isinstance(groups, dict) else None


def end_run(run, status=None, reason=None):
    """Stop the run if still going (status 'stopped' or 'cut'), then write wall.json (and
    stop.json), and delete a finished run's checkpoints: exit 0 with results.json (train.py's
    --exit-after-epoch also exits 0, without results, and its checkpoint resumes it)."""
    proc = run["proc"]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = write_wall(run)
    if status:
        with open(run["dir"] / "stop.json", "w") as f:
            json.dump({"status": status, "reason": reason, "epochs": run["epochs"]}, f)
    elif proc.returncode == 0 and (run["dir"] / "results.json").exists():
        for ckpt in run["dir"].glob("checkpoint*.pth"):
            ckpt.unlink()
    return wall


def run_all(args, t_start):
    """Start the runs in priority order, --jobs at a time; with --budget, stop runs as the top of
    this file says. Returns when every run has ended or been marked."""
    commit = git_commit()
    queue = [dict(row=row, seed=seed, name=run_name(row, seed), dir=Path(args.out) / run_name(row, seed),
                  flags=row_flags(row, args.extra), epochs=args.epochs, commit=commit,
                  command=run_command(args, row, seed, Path(args.out) / run_name(row, seed)),
                  grouping=flag_value(row_flags(row, args.extra), "--grouping", "gbg") != "none")
             for seed in args.seeds for row in args.runs
             if run_name(row, seed) not in getattr(args, "planned_out", ())]
    deadline = t_start + args.budget - RESERVE_S if args.budget is not None else None
    # one GPU is shared by its runs; CPU runs share the cores when they ask for more threads than there are
    shared = args.device == "cuda" or args.jobs * args.threads > (os.cpu_count() or 1)
    running = []

    def say(message):
        print(f"[{time.time() - t_start:6.0f} s] {message}", flush=True)

    def changed():  # the set of running runs changed: only epochs that begin after now count
        for r in running:
            log, _ = observe(r)
            r["since"] = max([e for e, _ in log], default=-1) + 2

    def finish(r, status=None, reason=None):
        if r["proc"].poll() is not None:  # it ended by itself just before: report it as it ended
            status = reason = None
        wall = end_run(r, status, reason)
        running.remove(r)
        say(f"{r['name']}: {status or 'exit ' + str(r['proc'].returncode)} after {wall:.0f} s"
            f"{' (' + reason + ')' if reason else ''}")
        changed()

    for r in [r for r in queue if finished(r["dir"])]:
        queue.remove(r)
        say(f"{r['name']}: finished in an earlier call, kept")
    for r in [r for r in queue if failed_with_checkpoint(r["dir"])]:
        queue.remove(r)
        code = read_json(r["dir"] / "wall.json")["exit_code"]
        say(f"{r['name']}: failed in an earlier call (exit {code}, checkpoint kept), not run again: see "
            f"{r['dir'] / 'stdout.txt'}; once the cause is fixed, delete its wall.json to resume it from the "
            f"checkpoint (its earlier wall time is then not counted), or the folder to start it over")
    last_wall = time.time()
    try:
        while queue or running:
            while queue and len(running) < args.jobs and (deadline is None or time.time() < deadline):
                run = queue.pop(0)
                resumed = start_run(args, run)
                running.append(run)
                changed()
                say(f"{'resume' if resumed else 'start'} {run['name']}: {' '.join(run['flags'])}")
            if deadline is not None and time.time() >= deadline:
                for r in list(running):
                    finish(r, "cut", "still running at the end of --budget")
                for r in queue:
                    if has_checkpoint(r["dir"]):  # an earlier call's unfinished run: kept for the next
                        say(f"{r['name']}: not resumed (--budget spent); kept for the next call")
                        continue
                    shutil.rmtree(r["dir"], ignore_errors=True)  # an earlier run's files are not this run's
                    r["dir"].mkdir(parents=True)
                    (r["dir"] / "stop.json").write_text(json.dumps(
                        {"status": "not started", "reason": "--budget spent before its turn", "epochs": r["epochs"]}))
                    say(f"{r['name']}: not started (--budget spent)")
                queue = []
                break
            time.sleep(POLL_S)
            for r in [r for r in running if r["proc"].poll() is not None]:
                finish(r)
            now = time.time()
            if now - last_wall >= WALL_EVERY_S:  # so that a call killed outright keeps its wall time
                for r in running:
                    write_wall(r)
                last_wall = now
            if deadline is not None and running and now < deadline:
                going = list(running)
                seen = [observe(r) for r in going]
                left = [r["epochs"] - max([e + 1 for e, _ in log], default=0) for r, (log, _) in zip(going, seen)]
                paces = [pace(log, r["since"], grouped_at) for r, (log, grouped_at) in zip(going, seen)]
                final = [p is not None and (not r["grouping"] or g is not None)
                         for r, p, (_, g) in zip(going, paces, seen)]
                for i in runs_to_stop(left, paces, final, now, deadline, shared):
                    finish(going[i], "stopped", f"cannot end by {deadline - t_start:.0f} s: {left[i]} epochs left at "
                                                f"{paces[i] or 0:.2f} s each, {len(going)} runs going")
    finally:  # interrupted: leave no run behind; each keeps its checkpoint and its wall time
        for r in list(running):  # every one, also a run that ended by itself just before
            if r["proc"].poll() is None:
                os.killpg(r["proc"].pid, signal.SIGKILL)
                r["proc"].wait()
            end_run(r)


# --- GPU check and sizing -------------------------------------------------------------------------
TRAIN_IMAGES, TEST_IMAGES = 12406, 10000  # CIFAR-10-LT IF 100 (the protocol of run_command), its test split


def run_seconds(row, args, report):
    """Seconds of GPU time one run of `row` needs alone, from tests/gpu_check.py's report: its
    epochs at train.py's images/s of the matching step (CE or BCL, with or without MGDA, --amp;
    every class its own objective: 10 group backwards instead of 4, so 4/10 of the rate; without
    --amp, bench (f)'s fp32/bf16 ratio), plus a test pass per epoch at 3x the CE rate. None when
    the report lacks the rate."""
    flags = row_flags(row, args.extra)
    mgda = flag_value(flags, "--moo", "mgda") == "mgda"
    kind = ("bcl" if flag_value(flags, "--loss", "ce") == "bcl" else "ce") + ("_gbg" if mgda else "")
    step = report.get("steps", {})
    rate = step.get({"ce_gbg": "gbg"}.get(kind, kind), {}).get("images_per_s")
    ce_rate = step.get("ce", {}).get("images_per_s")
    if not rate or not ce_rate:
        return None
    if mgda and flag_value(flags, "--grouping", "gbg") == "none":
        rate *= 4 / 10
    f = report.get("bench_f")
    if not args.amp:  # bench_f's fp32 / bf16 ratio; a skipped or failed part: unknown
        key = "exact" if mgda else "ce"
        fp32, bf16 = ((f or {}).get(k, {}).get(key) for k in ("fp32", "bf16"))
        if not fp32 or not bf16:
            return None
        rate *= fp32 / bf16
    return args.epochs * (TRAIN_IMAGES / rate + TEST_IMAGES / (3 * ce_rate))


def plan_runs(names, seconds, left):
    """The runs (in priority order, each needing seconds[i] of the GPU alone; None: unknown, 0) that
    can all end within `left` seconds sharing one GPU: the last of them ends when the sum of their
    needs is spent, whatever the sharing. Returns (kept, dropped)."""
    kept, dropped, total = [], [], 0.0
    for name, need in zip(names, seconds):
        if total + (need or 0.0) <= left:
            kept.append(name)
            total += need or 0.0
        else:
            dropped.append(name)
    return kept, dropped


def gpu_check_first(args, t_start):
    """--device cuda: tests/gpu_check.py first (a CUDA-only failure shows before the long runs),
    into OUT/gpu_check; with --budget, the runs that its images/s say cannot end in
    time are not started (stop.json says why) rather than cut. A run's need is the epochs it has
    left (--epochs less those of its checkpoint) at the per-epoch cost of run_seconds; finished runs
    (kept by run_all) and failed ones (not run again) are not planned; a planned-out run with a
    checkpoint keeps it for the next call ("not resumed")."""
    folder = Path(args.out) / "gpu_check"
    print(f"gpu check: tests/gpu_check.py {folder}", flush=True)
    code = subprocess.run([args.python, str(ROOT / "tests" / "gpu_check.py"), str(folder)], cwd=ROOT).returncode
    report = read_json(folder / "report.json")
    if code != 0 or not report:
        print(f"gpu check: exit {code}{'' if report else ', no report'}; see {folder} (the runs go on)", flush=True)
    if args.budget is None or not report or args.arch != "resnet32":
        return
    names, seconds = [], []
    for seed in args.seeds:
        for row in args.runs:
            run_dir = Path(args.out) / run_name(row, seed)
            if finished(run_dir) or failed_with_checkpoint(run_dir):
                continue
            whole = run_seconds(row, args, report)  # all of --epochs
            done = min(epochs_done(run_dir), args.epochs) if has_checkpoint(run_dir) else 0
            names.append(run_name(row, seed))
            seconds.append(None if whole is None else whole * (args.epochs - done) / args.epochs)
    left = args.budget - RESERVE_S - (time.time() - t_start)
    kept, args.planned_out = plan_runs(names, seconds, left)
    for name, need in zip(names, seconds):
        if name in args.planned_out:
            needs = "an unknown time" if need is None else f"{need:.0f} s"
            reason = f"planned out: needs {needs} of the GPU (tests/gpu_check.py's images/s), {left:.0f} s left"
            run_dir = Path(args.out) / name
            if has_checkpoint(run_dir):
                print(f"{name}: not resumed ({reason}); its checkpoint is kept for the next call", flush=True)
                continue
            shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's files are not this run's (as run_all)
            run_dir.mkdir(parents=True)
            (run_dir / "stop.json").write_text(json.dumps(
                {"status": "not started", "reason": reason, "epochs": args.epochs}))
            print(f"{name}: not started ({reason})", flush=True)


# --- Table ----------------------------------------------------------------------------------------
RESULT_KEYS = ("top1", "many", "medium", "few", "best_top1")


def run_status(folder):
    stop, wall, results = (read_json(folder / f) for f in ("stop.json", "wall.json", "results.json"))
    if stop:
        return stop["status"]
    if wall is None:
        return "incomplete (no wall.json)"
    code, kept = wall["exit_code"], has_checkpoint(folder)
    if stopped(code) or code == 0 and not results and kept:  # exit 0 without results: --exit-after-epoch
        return "unfinished (the same command resumes it)" if kept else \
            "unfinished (no checkpoint yet: the same command restarts it from zero)"
    if code != 0:
        return f"failed (exit {code}, checkpoint kept)" if kept else f"failed (exit {code})"
    return "done" if results else "failed (no results.json)"


def summarize_run(folder, name=None):
    """One table line from a run folder's files alone; results only for a finished run. name: the
    run's name in the table (an included folder's path relative to the table's)."""
    m = re.fullmatch(r"(.+)_s(\d+)", folder.name)
    row, seed = (m.group(1), int(m.group(2))) if m else (folder.name, None)
    log, wall, results = (read_log(folder / "log.txt"), read_json(folder / "wall.json"),
                          read_json(folder / "results.json"))
    status = run_status(folder)
    speeds = [e["images_per_s"] for e in log if "images_per_s" in e]
    line = dict(run=name or folder.name, row=row, seed=seed, status=status, epochs_done=epochs_done(folder, log),
                wall_s=wall["wall_s"] if wall else None, resumes=(wall or {}).get("resumes"),
                images_per_s=sum(speeds) / len(speeds) if speeds else None,
                **{k: None for k in RESULT_KEYS}, best_epoch=None)
    if status == "done":
        last, best = results["last"], results.get("best_test") or {}
        line.update(top1=last.get("top1"), many=last.get("many"), medium=last.get("medium"), few=last.get("few"),
                    best_top1=best.get("top1"), best_epoch=best.get("epoch"))
    return line


def order_key(line):
    rows = list(ROWS)
    return (rows.index(line["row"]) if line["row"] in rows else len(rows), line["row"],
            -1 if line["seed"] is None else line["seed"], line["run"])


def mean_lines(lines):
    """Per row with >= 2 finished seeds: the mean of each number and half its range over the seeds."""
    out = []
    for row in dict.fromkeys(l["row"] for l in lines):
        done = [l for l in lines if l["row"] == row and l["status"] == "done"]
        if len(done) < 2:
            continue
        line = dict(run=f"{row} (mean of {len(done)})", row=row, seeds=[l["seed"] for l in done], status="mean")
        for k in RESULT_KEYS + ("wall_s", "images_per_s"):
            v = [l[k] for l in done]
            ok = all(x is not None for x in v)
            line[k] = sum(v) / len(v) if ok else None
            line[k + "_halfrange"] = (max(v) - min(v)) / 2 if ok else None
        out.append(line)
    return out


def fmt(v, spread=None, digits=2):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def earlier_calls(old):
    """The calls recorded in an earlier table.json: its list, or, from a table.json written before
    the list, its single machine / wall_s / command (no date) when it has any."""
    if "calls" in old:
        return list(old["calls"])
    one = {k: old.get(k) for k in ("machine", "command", "wall_s")}
    return [dict(one, date=None)] if any(v is not None for v in one.values()) else []


def is_run_folder(d):
    return d.is_dir() and any((d / f).exists() for f in ("wall.json", "stop.json", "log.txt"))


def included_folders(out, include, old):
    """The run folders from elsewhere in the table, relative to out: --include's (checked here and
    by check_included), else those the earlier table.json recorded."""
    if include is None:
        return list(old.get("included", []))
    rel = []
    for d in map(Path, include):
        if not is_run_folder(d):
            fail(f"--include {d}: not a run folder (<row>_s<seed> with wall.json, stop.json or log.txt)")
        if d.resolve().parent == out.resolve():
            fail(f"--include {d}: already in --out {out}; include run folders from other folders only")
        rel.append(os.path.relpath(d.resolve(), out.resolve()))
    return sorted(dict.fromkeys(rel))


def write_table(out, call=None, include=None):
    """table.json and table.md from every run folder in out. calls: one record per call of
    repro.py on out (machine, command, wall seconds, date), the earlier ones kept from the earlier
    table.json, `call` (this one's; None for --summarize) appended. --summarize (no call) of a folder
whose runs have not changed since its table was written leaves table.json and table.md as they
are (a committed results folder stays clean)."""
    out = Path(out)
    folders = [d for d in sorted(out.iterdir()) if is_run_folder(d)] if out.is_dir() else []
    if not folders:
        fail(f"{out} holds no run folders (<row>_s<seed> with wall.json, stop.json or log.txt); "
             f"give the --out of a run")
    old = read_json(out / "table.json") or {}
    included = included_folders(out, include, old)
    local = [summarize_run(d) for d in folders]
    gone = [rel for rel in included if not is_run_folder(out / rel)]
    if gone and call is None:
        fail(f"{out / 'table.json'} includes {', '.join(gone)}, which is no run folder now; give --include again "
             f"with the folders the table should hold")
    # a run call: a vanished included folder, or one whose row and seed this call has run here, leaves the table
    taken = {(l["row"], l["seed"]) for l in local}
    extra = [(summarize_run(out / rel, rel), out / rel) for rel in included if rel not in gone]
    if call is not None:
        for rel in gone + [l["run"] for l, _ in extra if (l["row"], l["seed"]) in taken]:
            print(f"table: the included {rel} leaves the table ({'gone' if rel in gone else 'this folder has its row and seed now'})")
        extra = [(l, d) for l, d in extra if (l["row"], l["seed"]) not in taken]
        included = [l["run"] for l, _ in extra]
    check_included(extra, local, out)
    lines = sorted(local + [l for l, _ in extra], key=order_key)
    table = dict(calls=earlier_calls(old) + ([call] if call else []), **({"included": included} if included else {}),
                 runs=lines, means=mean_lines(lines),
                 spread="half the range over the finished seeds, (max - min) / 2",
                 columns="top1, many, medium, few: test top-1 after the last epoch (results.json 'last'); best_top1 / "
                         "best_epoch: the best test epoch (results.json 'best_test'); images_per_s: the mean over "
                         "log.txt's epochs; wall_s: summed over the calls that ran the run, resumes: how many of them resumed "
                         "it (- where the run predates the count); results only for runs with status 'done'")
    md = render_markdown(table)
    if call or not same_table(old, table):  # --summarize of an unchanged folder leaves table.json as it is
        write_if_changed(out / "table.json", json.dumps(table, indent=1) + "\n")
    write_if_changed(out / "table.md", md)
    return table, md


def same_table(old, table):
    """An earlier table.json says what `table` says: the same runs, means and calls (a table.json
    from before the calls list read as its single call); the wording of its descriptions aside."""
    skip = ("machine", "command", "wall_s", "columns", "spread")
    data = lambda t: {k: v for k, v in t.items() if k not in skip}
    return data(dict(old, calls=earlier_calls(old))) == data(json.loads(json.dumps(table)))


def write_if_changed(path, text):
    """Write text to path unless the file already holds it (its bytes and time stay as they are)."""
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)


def render_markdown(table):
    paper = any(l["row"] in PAPER_TOP1 for l in table["runs"])  # the column only where a row has a number
    head = ["run", "top-1 (last)", "Many", "Medium", "Few", "best top-1", "best epoch"] + \
        ["paper (Table 6, ResNet-32)"] * paper + ["epochs", "wall (min)", "resumed", "img/s", "status"]
    rows = []
    for l in table["runs"]:
        rows.append([l["run"], *(fmt(l[k]) for k in RESULT_KEYS[:4]), fmt(l["best_top1"]),
                     "-" if l["best_epoch"] is None else str(l["best_epoch"]),
                     *[fmt(PAPER_TOP1.get(l["row"]))] * paper, str(l["epochs_done"]),
                     fmt(None if l["wall_s"] is None else l["wall_s"] / 60, digits=1), "-" if l.get("resumes") is None else str(l["resumes"]),
                     fmt(l["images_per_s"], digits=0), l["status"]])
    for l in table["means"]:
        rows.append([f"{l['run']}", *(fmt(l[k], l[k + "_halfrange"]) for k in RESULT_KEYS[:4]),
                     fmt(l["best_top1"], l["best_top1_halfrange"]), "",
                     *[fmt(PAPER_TOP1.get(l["row"]))] * paper, "",
                     fmt(l["wall_s"] / 60, digits=1), "", fmt(l["images_per_s"], digits=0),
                     "seeds " + ", ".join(map(str, l["seeds"]))])
    text = []
    for n, call in enumerate(table["calls"] or [dict(machine=None, wall_s=None, command=None, date=None)], 1):
        wall = "not recorded" if call["wall_s"] is None else f"{call['wall_s'] / 60:.1f} min"
        when = f"Call {n} of {len(table['calls'])}, {call['date']}: " if call.get("date") else ""
        text += [f"{when}Machine: {call['machine'] or 'not recorded'}. Script wall time: {wall}.",
                 f"Command: `{call['command'] or 'not recorded'}`"]
    if table.get("included"):
        text.append(f"Included run folders (`--include`, relative to this folder): {', '.join(table['included'])}")
    text += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    if table["means"]:
        text += ["", "Mean rows: mean ± half the range (max - min) / 2 over the finished seeds."]
    return "\n".join(text) + "\n"


def machine(args):
    """The card (cuda) or the CPU model, for the table and the printout."""
    if args.device == "cuda":
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired):
            names = []
        card = ", ".join(names) or "cuda (nvidia-smi gave no name)"
        return f"{card}; {args.jobs} run(s) side by side, {args.threads} thread(s) each"
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores); {args.jobs} run(s) side by side, {args.threads} thread(s) each"


def main(args):
    t_start = time.time()
    if args.include is not None and not args.summarize:
        fail("--include joins run folders to a table: use it with --summarize")
    if args.summarize:
        _, md = write_table(args.out, include=args.include)
        print(md, end="")
        return 0
    if Path(args.out).exists() and not Path(args.out).is_dir():
        fail(f"--out {args.out} is a file; give a folder")
    check_settings(args)
    ensure_data(args.data, args.tarball, args.dataset)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and args.gpu_check:
        gpu_check_first(args, t_start)
    run_all(args, t_start)
    wall = time.time() - t_start
    card = machine(args)
    command = shlex.join(["python", "tests/repro.py"] + sys.argv[1:])
    table, md = write_table(args.out, dict(machine=card, command=command, wall_s=wall,
                                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    print(f"\nmachine: {card}\nwall time: {wall:.0f} s ({wall / 60:.1f} min)\n\n{md}", end="")
    failed = [l for l in table["runs"] if l["status"].startswith("failed")]
    for l in failed:
        stdout = Path(args.out) / l["run"] / "stdout.txt"
        tail = (stdout.read_text().strip().splitlines()[-1:] if stdout.exists() else []) or [""]
        print(f"{l['run']}: {l['status']}: {tail[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    # a stop from outside (kill, or the terminal or session closing) still ends the runs (finally):
    # they run in sessions of their own, so nothing else would reach them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    sys.exit(main(check_args(get_args_parser().parse_args())))
