"""train.py's contract with the person running it: a resume never continues another
experiment under new flags; an error in a DataLoader worker ends the process with one line instead
of a hang; the same command gives the same run whatever --workers; bad input and interruptions end
in one line before any work is lost, and say which checkpoint is kept."""
import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_lt
import gbg
import train as T

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--batch-size", "128",
        "--print-freq", "1000", "--workers", "0"]
PLAIN = ["--grouping", "none", "--moo", "none", "--sampler", "random"]


def train(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def start(*args, cwd=ROOT):
    """train.py as a terminal's foreground process: Ctrl-C's SIGINT not ignored (as it is in
    the processes of a shell's background job, this test's perhaps, which a child inherits)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(*argv):
    """train.main in this process (no interpreter start: the cheap way to run many short cases)."""
    return T.main(argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args([str(a) for a in argv]))


def one_line(rc, err, *words):
    assert rc != 0
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    for w in words:
        assert w in err, (w, err)
    return err


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.txt")]


def image_tree(root, size=72, per_class=(4, 2), classes=3, ext="png"):
    """folder-lt's train/<class>/ and test/<class>/ of random images; above 64 px they are read from
    disk by DataLoader workers (image files, ImageNet transforms), at or below it decoded into one tensor."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size, 3)) * 120 + np.roll([100, 60, 20], k)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{k}" / f"{i}.{ext}")
    return root


# ------------------------------------------------------------------------------------------ 1. resume
def test_resume_never_continues_another_experiment(tmp_path, monkeypatch, capsys):
    """A new user's sequence in the default output/: a GBG run stopped after its first epoch, then the CE
    baseline's command without --output-dir. It stops with one line naming the flags and the fix; the
    GBG run's files are left as they were. Every flag that changes the experiment is refused the same
    way (no state_dict traceback for --arch / --loss); the flags that do not are logged and resume."""
    monkeypatch.chdir(tmp_path)
    gbg_run = [*FAST, "--epochs", "2"]
    run(*gbg_run, "--exit-after-epoch", "0")
    saved = (tmp_path / "output" / "checkpoint.pth").read_bytes()
    ce = train(*gbg_run, *PLAIN, cwd=tmp_path)
    err = one_line(ce.returncode, ce.stderr, "--grouping none", "--moo none", "--sampler random", "--grouping gbg",
                   "--output-dir")
    assert "output/checkpoint.pth" in err and "resumed" not in ce.stdout
    assert (tmp_path / "output" / "checkpoint.pth").read_bytes() == saved
    assert not (tmp_path / "output" / "results.json").exists()
    for flags in (["--num-groups", "3"], ["--imb-factor", "10"], ["--lr", "0.5"], ["--arch", "resnet20"],
                  ["--loss", "bcl"], ["--seed", "1"], ["--no-recalibrate-bn"]):
        with pytest.raises(data_lt.UserError, match=flags[0].replace("--no-", "no --")) as e:
            run(*gbg_run, *flags)
        assert "\n" not in str(e.value) and "--output-dir" in str(e.value)
    capsys.readouterr()
    # where the data is, the loaders, the printing and evaluating cadence: the same run goes on
    run(*gbg_run, "--workers", "1", "--print-freq", "3", "--eval-every", "2", "--data-root", "elsewhere")
    out = capsys.readouterr().out
    assert "resumed from output/checkpoint.pth at epoch 1" in out
    resume = [l for l in out.splitlines() if l.startswith("resume: ")]
    assert len(resume) == 1 and "do not change the experiment" in resume[0], out
    for flag in ("--workers 1", "--print-freq 3", "--eval-every 2", "--data-root elsewhere", "--workers 0",
                 "--print-freq 1000", "--data-root ./data"):
        assert flag in resume[0], (flag, resume[0])
    assert [e["epoch"] for e in read_log(tmp_path / "output")] == [0, 1]
    assert json.load(open(tmp_path / "output" / "results.json"))["args"]["grouping"] == "gbg"


def test_amp_on_a_cpu_without_native_bf16_stops_with_one_line_and_a_run_resumes_across_amp(tmp_path, monkeypatch,
                                                                                               capsys):
    """--amp on a CPU: refused in one line before anything is written where the CPU has no native
    bf16 (emulated bf16 trains ~7x slower), run where it has; the run line says which arithmetic
    runs; a run begun with --amp resumes without it (and back), saying so in one line."""
    monkeypatch.chdir(tmp_path)
    cmd = [*FAST, "--epochs", "2", "--warmup-epochs", "1", "--output-dir", "amp"]
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(data_lt.UserError, match="--amp on this CPU: it has no native bf16") as e:
        run(*cmd, "--amp")
    assert "\n" not in str(e.value) and "leave out --amp" in str(e.value)
    assert not (tmp_path / "amp").exists()  # stopped before the output folder was made
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: True)
    run(*cmd, "--amp", "--exit-after-epoch", "0")
    out = capsys.readouterr().out
    assert [l for l in out.splitlines() if l.startswith("run: ")][0].endswith("device cpu, bf16 autocast"), out
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)
    run(*cmd)  # where bf16 is slow, the run goes on in fp32
    out = capsys.readouterr().out
    assert "resumed from amp/checkpoint.pth at epoch 1" in out
    resume = [l for l in out.splitlines() if l.startswith("resume: ") and "amp" in l]
    assert resume == ["resume: no --amp (the checkpoint's run had --amp): from epoch 1 on the network computes "
                      "in fp32"], out
    assert [l for l in out.splitlines() if l.startswith("run: ")][0].endswith("device cpu, fp32")
    assert [e["epoch"] for e in read_log(tmp_path / "amp")] == [0, 1]
    # the real capability check answers without error on this machine, whatever the CPU
    monkeypatch.undo()
    assert T.cpu_has_native_bf16() in (True, False)


def test_resume_flag_comparison_by_hand():
    """Which flags may change is one list; --num-groups auto matches the G it chose, --views left
    out matches the run's own, and a flag the checkpoint does not know is not compared."""
    _, args = parse(*FAST)
    saved = dict(vars(args))
    T.check_resume_flags({"args": saved}, args, "c.pth")
    for key in T.RESUME_MAY_CHANGE:
        assert key in vars(args), key  # no stale names in the list
    args.num_groups = "auto"
    with pytest.raises(data_lt.UserError, match="--num-groups auto"):
        T.check_resume_flags({"args": saved}, args, "c.pth")
    T.check_resume_flags({"args": saved, "groups_info": {"num_groups_auto": {}}}, args, "c.pth")
    args.views, saved["views"] = None, "device"
    T.check_resume_flags({"args": saved, "groups_info": {"num_groups_auto": {}}}, args, "c.pth")
    del saved["momentum"]
    args.momentum = 0.5
    T.check_resume_flags({"args": saved, "groups_info": {"num_groups_auto": {}}}, args, "c.pth")


def other_value(action, value):
    """A value of the flag `action` other than `value`, as its parser would give it."""
    if action.choices:
        return next(c for c in action.choices if c != value)
    if isinstance(value, bool) or action.nargs == 0:
        return not value
    if action.nargs in ("+", "*"):
        return [7, 9] if value != [7, 9] else [8]
    kind = action.type or str
    return kind("3") if value is None or value != kind("3") else kind("5")


def test_every_flag_outside_the_list_is_refused_at_resume():
    """Each train.py flag not in RESUME_MAY_CHANGE, changed alone against a checkpoint's flags, stops
    the resume with one line naming it: a flag slipped into the list (--data-seed: the run would go
    on over another long-tailed subset) is seen, whichever it is. The list's own flags resume."""
    # the reference, written out here (not read from train.py): where the data and outputs are, the
    # device, the loaders, the cadence of prints, evaluations and measurements, compiling, the tests'
    # stop, --preset (it only fills flags, compared one by one), --eval / --resume, and --amp (on
    # purpose: a bf16 run may go on where bf16 is slow). A flag added to either side is a decision.
    may_change = {"data_root", "output_dir", "device", "workers", "print_freq", "eval_every", "ratio_every",
                  "diag_every", "diag_batches", "compile", "exit_after_epoch", "preset", "eval", "resume", "amp"}
    _, args = parse(*FAST)
    saved = dict(vars(args))
    actions = [a for a in T.get_args_parser()._actions if a.option_strings]
    assert may_change <= {a.dest for a in actions}
    assert {k for k in T.RESUME_MAY_CHANGE if k not in ("world_size", "rank", "local_rank", "distributed")} \
        == may_change
    for action in actions:
        changed = argparse.Namespace(**saved)
        setattr(changed, action.dest, other_value(action, saved[action.dest]))
        if action.dest in may_change:
            T.check_resume_flags({"args": saved, "epoch": 0}, changed, "c.pth")
            continue
        flag = action.option_strings[0]
        with pytest.raises(data_lt.UserError, match="another run") as e:
            T.check_resume_flags({"args": saved, "epoch": 0}, changed, "c.pth")
        assert re.search(re.escape(flag) + "[ ,)]", str(e.value)) and "\n" not in str(e.value), (flag, str(e.value))


def parse(*argv):
    args = T.get_args_parser().parse_args(list(argv))
    T.init_distributed(args)  # rank, world size, device, as main sets them
    T.fill_defaults(args)
    return T, args


# ------------------------------------------------------------------------------------------ 2. workers
def bad_image_cases(tmp_path):
    """Two data sets with one bad image each: a folder-lt tree of 72 px images with a truncated JPEG
    (met by the grouping's loader: GBG groups at epoch 0), and an ImageNet-LT split file of 2,100
    lines, more than read_split checks one by one, whose unchecked lines name missing images (met
    by the training loader)."""
    folder = image_tree(tmp_path / "folder", ext="jpg", per_class=(3, 1))
    jpeg = folder / "train" / "c1" / "1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    inet = tmp_path / "inet"
    image_tree(inet, size=16, per_class=(1, 1), classes=1)
    real = "train/c0/0.png"
    n = data_lt.CHECK_ALL_UP_TO + 100
    checked = {0, *np.random.RandomState(0).choice(n, 1000, replace=False).tolist()}  # read_split's sample
    lines = [f"{real if i in checked else f'train/missing/{i}.png'} {i % 5}\n" for i in range(n)]
    (inet / "ImageNet_LT_train.txt").write_text("".join(lines))
    for split in ("val", "test"):
        (inet / f"ImageNet_LT_{split}.txt").write_text(f"{real} 0\n")
    common = ["--arch", "resnet8", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--print-freq", "1000"]
    return {"corrupt jpeg": (["--dataset", "folder-lt", "--data-root", folder, "--imb-factor", "1", "--num-groups", "2",
                              *common], ["cannot decode image", str(jpeg)]),
            "missing image": (["--dataset", "imagenet-lt", "--data-root", inet, *PLAIN, *common],
                              ["does not exist", "train/missing/"])}


def test_a_bad_image_ends_the_run_with_one_line_whatever_the_workers(tmp_path):
    """With 2 DataLoader workers, a corrupt or missing image ends the process at once with one line
    and a non-zero exit code (workers ignore SIGTERM, and multiprocessing ends them at exit with
    SIGTERM and then waits: the process used to hang after a traceback); with none, the same line
    (as the UserError that train.py prints as one line: no process needed)."""
    cases = bad_image_cases(tmp_path)
    procs = {}
    try:  # whatever fails, no train.py (nor its workers, in its process group) outlives the test
        for name, (argv, words) in cases.items():
            procs[name] = (start(*argv, "--workers", 2, "--output-dir", tmp_path / name), words, time.time())
        for name, (argv, words) in cases.items():
            with pytest.raises(data_lt.UserError) as e:
                run(*argv, "--workers", 0, "--output-dir", tmp_path / f"{name} 0")
            assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
        for name, (p, words, t0) in procs.items():
            try:
                out, err = p.communicate(timeout=600)  # seconds on an idle machine; a hang never ends
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}, --workers 2: still running after {time.time() - t0:.0f} s")
            one_line(p.returncode, err, *words)
    finally:
        for p, _, _ in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # the process and its DataLoader workers
                p.communicate()


def test_utf8_byte_order_mark_in_a_split_file(tmp_path):
    image_tree(tmp_path, size=16, per_class=(2, 1), classes=2)
    (tmp_path / "list.txt").write_bytes("\ufefftrain/c0/0.png 0\ntrain/c1/1.png 1\n".encode("utf-8"))
    assert data_lt.read_split(str(tmp_path), "list.txt", 2) == [("train/c0/0.png", 0, 1), ("train/c1/1.png", 1, 2)]


# ------------------------------------------------------------------------------------------ 4. same run
def test_image_files_train_the_same_with_0_1_and_2_workers(tmp_path):
    """Images above 64 px are cropped and flipped in DataLoader workers: each sample's draws come from
    (seed, epoch, sample), so 0, 1 and 2 workers give the same losses and weights, as the BCL views."""
    data = image_tree(tmp_path / "data", per_class=(2, 1))
    runs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        run("--dataset", "folder-lt", "--data-root", data, "--imb-factor", "1", "--arch", "resnet8", "--device", "cpu",
            "--epochs", "2", "--batch-size", "3", "--print-freq", "1000", *PLAIN, "--workers", workers,
            "--output-dir", out)
        runs[workers] = ([e["train_loss"] for e in read_log(out)],
                         torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"])
    (loss0, w0) = runs[0]
    for workers in (1, 2):
        loss, w = runs[workers]
        assert loss == loss0, (workers, loss, loss0)
        assert all(torch.equal(w0[k], w[k]) for k in w0), workers
    assert loss0[0] != loss0[1]


# ------------------------------------------------------------------------------------------ 5. bad input
def test_output_dir_that_cannot_hold_the_run_stops_before_training(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    locked = Path("/proc/self")  # a folder not even root can write to
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    trained = []
    monkeypatch.setattr(T, "train_one_epoch", lambda *a, **k: trained.append(1) or {})
    for out, words in ((a_file, "is a file"), (a_file / "sub", "cannot be written"), (locked, "cannot be written")):
        with pytest.raises(data_lt.UserError, match=words) as e:
            run(*FAST, *PLAIN, "--epochs", "1", "--output-dir", out)
        assert f"--output-dir {out}" in str(e.value) and "\n" not in str(e.value)
    assert trained == []
    assert not list(tmp_path.glob("**/.write-test-*"))


@pytest.mark.parametrize("argv, flag", [(["--wd", "nan"], "--wd nan"), (["--wd", "inf"], "--wd inf"),
                                        (["--lr", "inf"], "--lr inf"), (["--imb-factor", "nan"], "--imb-factor nan"),
                                        (["--wd", "-1"], "--wd -1")])
def test_non_finite_and_negative_flags_are_refused(argv, flag):
    with pytest.raises(data_lt.UserError, match=flag) as e:
        parse(*argv)
    assert "\n" not in str(e.value)


def test_divergence_message_is_true(tmp_path):
    """A run diverging in its first epoch has no checkpoint to keep, and the message says so; the
    message names --wd beside --lr (here a huge --wd made it diverge)."""
    with pytest.raises(data_lt.UserError) as e:
        run(*FAST, *PLAIN, "--epochs", "1", "--wd", "1e30", "--output-dir", tmp_path)
    msg = str(e.value)
    assert "no checkpoint was written" in msg and "is kept" not in msg, msg
    assert "--wd (now 1e+30)" in msg and "--lr (now 0.1)" in msg and "--output-dir" in msg
    assert not (tmp_path / "checkpoint.pth").exists()


def test_ctrl_c_and_sigterm_say_which_checkpoint_is_kept(tmp_path, capsys):
    """SIGINT (Ctrl-C) and SIGTERM mid-run: one line naming the epoch of the checkpoint left behind
    (read back from the file afterwards) and that the same command resumes; it does."""
    argv = [*FAST, *PLAIN, "--epochs", "50"]
    procs = {sig: start(*argv, "--output-dir", tmp_path / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline = time.time() + 600
    for sig, p in procs.items():
        while not (tmp_path / sig.name / "checkpoint.pth").exists() and time.time() < deadline:
            assert p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.05)
        p.send_signal(sig)
    for sig, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 128 + sig, (sig, p.returncode, err[-3000:])
        kept = tmp_path / sig.name / "checkpoint.pth"
        if not kept.exists():  # stopped between save_atomic's two renames: the previous one is the one kept
            kept = kept.with_name("checkpoint.prev.pth")
        epoch = torch.load(kept, map_location="cpu", weights_only=False)["epoch"]
        err = one_line(p.returncode, err, f"stopped by {sig.name}",
                       f"the checkpoint of epoch {epoch} in {tmp_path / sig.name} is kept",
                       f"the same command resumes from epoch {epoch + 1}")
    run(*argv, "--output-dir", tmp_path / "SIGTERM", "--exit-after-epoch", epoch + 1)  # the same command, stopped
    assert f"resumed from {tmp_path / 'SIGTERM' / 'checkpoint.pth'} at epoch {epoch + 1}" in capsys.readouterr().out


def test_eval_reads_the_data_root_of_the_checkpoint(tmp_path, monkeypatch, capsys):
    """--eval --resume CKPT without --data-root evaluates on the data the run trained on (folder-lt
    here, whose images exist only there), from any folder; a --data-root given still wins."""
    data = image_tree(tmp_path / "data", size=32, per_class=(4, 3))
    out = tmp_path / "run"
    run("--dataset", "folder-lt", "--data-root", data, "--imb-factor", "1", *FAST[2:], *PLAIN, "--epochs", "1",
        "--output-dir", out)
    logged = read_log(out)[-1]["test_top1"]
    monkeypatch.chdir(tmp_path / "run")
    results = run("--device", "cpu", "--eval", "--resume", out / "checkpoint.pth")
    assert results["test"]["top1"] == logged and f"data root {data}" in capsys.readouterr().out
    with pytest.raises(data_lt.UserError, match="nowhere"):
        run("--device", "cpu", "--eval", "--resume", out / "checkpoint.pth", "--data-root", tmp_path / "nowhere")


def test_eval_takes_the_model_options_of_the_checkpoint(tmp_path, capsys):
    """--eval --resume CKPT alone evaluates under the checkpoint's --imb-factor (and data set, arch):
    at IF 10, synthetic-lt's classes are Many and Medium, where the default IF 100 would make some
    Few; its Many / Medium / Few are the ones the run logged."""
    out = tmp_path / "run"
    run(*FAST, *PLAIN, "--imb-factor", "10", "--epochs", "1", "--output-dir", out)
    logged = read_log(out)[-1]
    assert logged["test_few"] is None and logged["test_many"] is not None and logged["test_medium"] is not None
    results = run("--device", "cpu", "--eval", "--resume", out / "checkpoint.pth")
    assert {k: results["test"][k] for k in ("top1", "many", "medium", "few")} == \
        {k: logged[f"test_{k}"] for k in ("top1", "many", "medium", "few")}
    assert "synthetic-lt IF 10, data seed 0, resnet8" in capsys.readouterr().out


def test_a_run_inside_its_warm_up_says_so_and_the_eta_waits_for_a_gbg_epoch(tmp_path, capsys):
    """--epochs 1 under a 5-epoch warm-up: the run line gives the warm-up that runs, and one line says
    that the lr stays below --lr (the logged lr is under the bound it gives) and that the classes are
    grouped at the initial model. A run with a warm-up of 1 epoch before 2 GBG epochs: the epoch line
    at the end of the warm-up gives no run ETA priced at warm-up epochs."""
    run(*FAST, "--epochs", "1", "--warmup-epochs", "5", "--lr", "0.1", "--output-dir", tmp_path / "short")
    lines = capsys.readouterr().out.splitlines()
    assert "(warm-up 1 of its 5 epochs)" in [l for l in lines if l.startswith("run: ")][0]
    notes = [l for l in lines if "warm-up:" in l]
    assert notes == ["run: 1 epoch, not longer than the 5-epoch warm-up: the lr rises to at most 0.02, never to --lr "
                     "0.1, and the classes are grouped at the initial model (epoch 0), not at the end of the warm-up; "
                     "for a whole run give more --epochs, or --warmup-epochs 0 for a quick check"], lines
    assert 0.01 < read_log(tmp_path / "short")[0]["lr"] <= 0.02 and "groups (epoch 0)" in "\n".join(lines)
    run(*FAST, "--epochs", "3", "--warmup-epochs", "1", "--output-dir", tmp_path / "warm")
    lines = capsys.readouterr().out.splitlines()
    assert not [l for l in lines if "warm-up:" in l] and "(warm-up 1.0)" in lines[0]
    ends = [l for l in lines if re.match(r"epoch \d: ", l)]
    assert ends[0].endswith("elapsed, eta after the first GBG epoch"), ends
    assert re.search(r"elapsed, eta \d:\d\d:\d\d$", ends[1]) and ends[2].endswith("elapsed"), ends


@pytest.mark.parametrize("num_groups", ["3", "auto"])
def test_a_stop_after_the_grouping_resumes_without_grouping_again(tmp_path, monkeypatch, capsys, num_groups):
    """Ctrl-C in the first GBG epoch (grouped at its start, after the warm-up's checkpoint): the
    checkpoint was written again with the groups, so the same command goes on without grouping
    again (111 s in issue #37), to the weights and groups of a run never stopped; --num-groups auto
    keeps the G it chose there."""
    argv = [*FAST, "--epochs", "2", "--warmup-epochs", "1", "--num-groups", num_groups]
    run(*argv, "--output-dir", tmp_path / "ref")
    real = T.train_one_epoch

    def stop_in_epoch_1(model, loader, optimizer, epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, loader, optimizer, epoch, *a, **k)
    monkeypatch.setattr(T, "train_one_epoch", stop_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(*argv, "--output-dir", tmp_path / "stopped")
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["pending_groups"]["epoch"] == 1
    monkeypatch.setattr(T, "train_one_epoch", real)
    monkeypatch.setattr(T, "group_classes", lambda *a, **k: pytest.fail("grouped again"))
    capsys.readouterr()
    run(*argv, "--output-dir", tmp_path / "stopped")
    out = capsys.readouterr().out
    assert "groups (epoch 1): as grouped before the stop" in out and "resumed from" in out
    ref, got = (torch.load(tmp_path / d / "checkpoint.pth", map_location="cpu", weights_only=False)
                for d in ("ref", "stopped"))
    assert np.array_equal(ref["groups"], got["groups"]) and "pending_groups" not in got
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    assert [e["epoch"] for e in read_log(tmp_path / "stopped")] == [0, 1]


def test_a_negligible_gbg_update_is_reported(tmp_path, monkeypatch, capsys):
    """An MGDA update a millionth of the plain gradient (scripted: the real step, scaled) for 3 epochs
    in a row: a warning in the log at the third, none before."""
    real = gbg.mgda_backward

    def tiny(losses, params, **kw):
        out = real(losses, params, **kw)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1e-6)
        return out
    monkeypatch.setattr(gbg, "mgda_backward", tiny)
    run(*FAST, "--batch-size", "256", "--grouping", "count", "--num-groups", "2", "--ratio-every", "1", "--epochs", "3",
        "--output-dir", tmp_path)
    assert all(e["update_ratio"] < 1e-5 for e in read_log(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    warned = [i for i, l in enumerate(lines) if "warning: the GBG update" in l]
    epochs = [i for i, l in enumerate(lines) if l.startswith("epoch ") and ": test top-1" in l]
    assert len(warned) == 1 and epochs[1] < warned[0] < epochs[2], lines
    assert "for 3 epochs" in lines[warned[0]]
