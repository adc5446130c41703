"""tests/repro.py across calls, on planted run folders and a fake train.py (--python is the seam: a
script that takes train.py's command line and does what the test plants for its run folder, in
well under a second): which runs a later call keeps, resumes, refuses or leaves alone, what the
table and its statuses say, and how the GPU plan counts runs that earlier calls began or ended."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "repro.py"
spec = importlib.util.spec_from_file_location("repro_resume", SCRIPT)
repro = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro)

# The fake train.py: PLAN[folder name] says how many epochs to log (appended to log.txt, from the
# planted checkpoint's epoch + 1), whether to write results.json, a checkpoint, how long to sleep
# and the exit code; each start is counted in starts.txt beside the run folders.
FAKE = '''
import json, os, sys, time
from pathlib import Path
argv = sys.argv[2:]
out = Path(argv[argv.index("--output-dir") + 1])
plan = json.loads(Path(os.environ["FAKE_PLAN"]).read_text()).get(out.name, {})
with open(out.parent / "starts.txt", "a") as f:
    f.write(out.name + "\\n")
if plan.get("pidfile"):
    (out / "pid").write_text(str(os.getpid()))
first = plan.get("from", 0)
with open(out / "log.txt", "a") as f:
    for e in range(first, first + plan.get("epochs", 1)):
        f.write(json.dumps({"epoch": e, "time_s": float(e), "images_per_s": 100.0}) + "\\n")
if plan.get("checkpoint"):
    (out / "checkpoint.pth").write_bytes(b"not a real checkpoint")
if plan.get("results"):
    (out / "results.json").write_text(json.dumps({"last": {"top1": 50.0, "many": 60.0, "medium": 40.0, "few": None},
                                                  "best_test": {"top1": 51.0, "epoch": 0}}))
print(plan.get("say", "fake train.py ran"), file=sys.stderr, flush=True)
time.sleep(plan.get("sleep", 0))
sys.exit(plan.get("exit", 0))
'''


@pytest.fixture
def fake(tmp_path):
    """(the fake interpreter, the plan file, --data): a script that runs FAKE whatever it is given."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    (tmp_path / "data" / "train").mkdir(parents=True)
    return script, tmp_path / "plan.json", tmp_path / "data"


def call(fake, out, plan, *argv):
    script, plan_file, data = fake
    plan_file.write_text(json.dumps(plan))
    env = dict(os.environ, FAKE_PLAN=str(plan_file), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--python", str(script), "--data",
                           str(data), "--out", str(out), "--epochs", "4", *argv],
                          env=env, capture_output=True, text=True, timeout=300)


def starts(out):
    f = Path(out) / "starts.txt"
    return f.read_text().split() if f.exists() else []


def plant(folder, epochs=(), checkpoint=None, wall=None, results=False):
    """A run folder as an earlier call left it: log.txt lines of `epochs`, a checkpoint (file name,
    epoch) saved as train.py does, wall.json, results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps({"epoch": e, "time_s": float(e)}) + "\n" for e in epochs))
    if checkpoint:
        torch.save({"epoch": checkpoint[1], "model": {}}, folder / checkpoint[0])
    if wall is not None:
        (folder / "wall.json").write_text(json.dumps(dict({"run": str(folder), "wall_s": 100.0, "flags": [],
                                                           "resumes": 0, "commit": None}, **wall)))
    if results:
        (folder / "results.json").write_text(json.dumps({"last": {"top1": 1.0}, "best_test": {}}))
    (folder / "stdout.txt").write_text("earlier call\n")
    return folder


# --- Fix 2: a run that failed by itself is not "unfinished", and not resumed again --------------
def test_a_run_that_failed_with_a_checkpoint_is_a_failure_and_not_run_again(tmp_path, fake):
    out = tmp_path / "out"
    plant(out / "ce_s0", epochs=[0, 1], checkpoint=("checkpoint.pth", 1), wall={"exit_code": None})
    say = "train.py: error: the loss diverged at epoch 2"
    r = call(fake, out, {"ce_s0": {"from": 2, "checkpoint": True, "exit": 1, "say": say}}, "--runs", "ce")
    assert "resume ce_s0" in r.stdout  # stopped with its session: resumed
    assert r.returncode == 1 and f"ce_s0: failed (exit 1, checkpoint kept): {say}" in r.stdout
    assert repro.run_status(out / "ce_s0") == "failed (exit 1, checkpoint kept)"
    assert (out / "ce_s0" / "checkpoint.pth").exists()
    r = call(fake, out, {}, "--runs", "ce")  # the next call leaves it alone and says how to go on
    assert starts(out) == ["ce_s0"] and r.returncode == 1
    assert "ce_s0: failed in an earlier call (exit 1, checkpoint kept), not run again" in r.stdout
    assert "delete its wall.json to resume it" in r.stdout
    # stopped from outside (signals, train.py's exits on SIGINT / SIGKILL / SIGTERM): unfinished
    for code in (None, -9, -15, 130, 137, 143):
        plant(out / "gbg_s0", epochs=[0], checkpoint=("checkpoint.pth", 0), wall={"exit_code": code})
        assert repro.run_status(out / "gbg_s0") == "unfinished (the same command resumes it)", code


# --- Fix 4: checkpoint.prev.pth alone is a checkpoint ----------------------------------------------
def test_a_run_killed_between_save_atomics_renames_is_resumed_not_emptied(tmp_path, fake):
    out = tmp_path / "out"
    d = plant(out / "ce_s0", epochs=[0, 1, 2], checkpoint=("checkpoint.prev.pth", 1), wall={"exit_code": None})
    assert repro.run_status(d) == "unfinished (the same command resumes it)"
    r = call(fake, out, {"ce_s0": {"from": 2, "epochs": 2, "results": True}}, "--runs", "ce")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resume ce_s0" in r.stdout and "start ce_s0" not in r.stdout
    assert (d / "stdout.txt").read_text().startswith("earlier call\n")  # appended to, not emptied
    wall = json.loads((d / "wall.json").read_text())
    assert wall["resumes"] == 1 and wall["wall_s"] > 100.0 and wall["exit_code"] == 0
    assert not list(d.glob("checkpoint*.pth"))  # finished: deleted


def test_a_prev_checkpoint_alone_keeps_a_run_whose_budget_is_spent(tmp_path, fake):
    out = tmp_path / "out"
    d = plant(out / "gbg_s0", epochs=[0, 1], checkpoint=("checkpoint.prev.pth", 1), wall={"exit_code": None})
    r = call(fake, out, {"ce_s0": {"sleep": 60}}, "--runs", "ce,gbg", "--budget", "11.5")
    assert "gbg_s0: not resumed (--budget spent); kept for the next call" in r.stdout
    assert (d / "checkpoint.prev.pth").exists() and (d / "log.txt").exists()


# --- Fix 8: --exit-after-epoch (exit 0, no results.json) keeps the checkpoint --------------------
def test_exit_0_without_results_keeps_the_checkpoint_and_resumes(tmp_path, fake):
    out = tmp_path / "out"
    r = call(fake, out, {"ce_s0": {"checkpoint": True}}, "--runs", "ce", "--extra=--exit-after-epoch 0")
    d = out / "ce_s0"
    assert r.returncode == 0 and (d / "checkpoint.pth").exists()
    assert repro.run_status(d) == "unfinished (the same command resumes it)"
    r = call(fake, out, {"ce_s0": {"from": 1, "results": True}}, "--runs", "ce", "--extra=--exit-after-epoch 0")
    assert "resume ce_s0" in r.stdout and repro.run_status(d) == "done"


# --- Fix 3: kept and resumed runs are checked against this call's settings -----------------------
@pytest.mark.parametrize("then, words", [
    (["--epochs", "5"], "(--epochs 4; this call: --epochs 5)"),
    (["--arch", "resnet8"], "(--arch resnet32; this call: --arch resnet8)"),
    (["--extra=--moo-grad last"], "this call: --moo-grad last)"),
])
def test_a_folder_made_with_other_settings_is_refused(tmp_path, fake, then, words):
    out = tmp_path / "out"
    r = call(fake, out, {"ce_s0": {"results": True}}, "--runs", "ce")
    assert r.returncode == 0, r.stdout + r.stderr
    command = json.loads((out / "ce_s0" / "wall.json").read_text())["command"]
    assert command[2:][command[2:].index("--epochs") + 1] == "4" and command[-6:] == repro.ROWS["ce"].split()
    r = call(fake, out, {"ce_s0": {"results": True}}, "--runs", "ce", *then)
    assert r.returncode != 0 and r.stdout == "" and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"repro.py: error: {out / 'ce_s0'} was made with other train.py settings")
    assert words in r.stderr and "another --out" in r.stderr and starts(out) == ["ce_s0"]
    # the same settings: kept
    r = call(fake, out, {}, "--runs", "ce")
    assert r.returncode == 0 and "ce_s0: finished in an earlier call, kept" in r.stdout


def test_a_run_begun_with_amp_resumes_without_it(tmp_path, fake):
    """--amp is the arithmetic, not the experiment: train.py resumes across it (saying so), so
    repro.py does not refuse the folder; the call's command without --amp is the one recorded."""
    out = tmp_path / "out"
    r = call(fake, out, {"ce_s0": {"checkpoint": True, "exit": 143}}, "--runs", "ce", "--amp")
    assert "--amp" in json.loads((out / "ce_s0" / "wall.json").read_text())["command"]
    r = call(fake, out, {"ce_s0": {"from": 1, "results": True}}, "--runs", "ce", "--no-amp")
    assert r.returncode == 0 and "resume ce_s0" in r.stdout, r.stdout + r.stderr
    assert "--amp" not in json.loads((out / "ce_s0" / "wall.json").read_text())["command"]


def test_a_resumed_run_with_other_settings_is_refused_and_old_folders_are_taken(tmp_path, fake):
    out = tmp_path / "out"
    r = call(fake, out, {"ce_s0": {"checkpoint": True, "exit": 143}}, "--runs", "ce")
    assert "unfinished (the same command resumes it)" in r.stdout
    r = call(fake, out, {}, "--runs", "ce", "--epochs", "6")
    assert r.returncode != 0 and "(--epochs 4; this call: --epochs 6)" in r.stderr and starts(out) == ["ce_s0"]
    # a folder from before wall.json had the command: taken as it is
    plant(out / "gbg_s0", epochs=range(4), wall={"exit_code": 0}, results=True)
    r = call(fake, out, {}, "--runs", "gbg", "--epochs", "6")
    assert r.returncode == 0 and "gbg_s0: finished in an earlier call, kept" in r.stdout


# --- Fix 5: one record per call in the table -------------------------------------------------------
def test_the_table_keeps_every_call(tmp_path, fake):
    out = tmp_path / "out"
    call(fake, out, {"ce_s0": {"checkpoint": True, "exit": 143}}, "--runs", "ce")
    r = call(fake, out, {"ce_s0": {"from": 1, "results": True}}, "--runs", "ce", "--jobs", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    table = json.loads((out / "table.json").read_text())
    calls = table["calls"]
    assert len(calls) == 2 and all(set(c) == {"machine", "command", "wall_s", "date"} for c in calls)
    assert calls[0]["command"].endswith("--runs ce") and calls[1]["command"].endswith("--runs ce --jobs 1")
    assert all(c["wall_s"] > 0 and c["machine"] and c["date"].endswith("UTC") for c in calls)
    md = (out / "table.md").read_text()
    assert md.startswith(f"Call 1 of 2, {calls[0]['date']}: Machine: ") and f"`{calls[0]['command']}`" in md
    assert f"Call 2 of 2, {calls[1]['date']}: Machine: " in md and f"`{calls[1]['command']}`" in md
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", "--out", str(out)], capture_output=True, text=True)
    assert r.stdout == md and json.loads((out / "table.json").read_text())["calls"] == calls
    # a table.json from before the list: its single record is read, and the next call appends to it
    (out / "table.json").write_text(json.dumps({"machine": "old box", "wall_s": 120.0, "command": "python old"}))
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", "--out", str(out)], capture_output=True, text=True)
    assert r.stdout.startswith("Machine: old box. Script wall time: 2.0 min.\nCommand: `python old`\n")
    call(fake, out, {}, "--runs", "ce")
    calls = json.loads((out / "table.json").read_text())["calls"]
    assert [c["machine"] for c in calls][0] == "old box" and len(calls) == 2


# --- Fix 6: an interrupt ends every running run as it ended ------------------------------------------
def test_an_interrupt_reports_a_run_that_ended_just_before_as_it_ended(tmp_path, fake, monkeypatch):
    script, plan_file, data = fake
    out = tmp_path / "out"
    plan_file.write_text(json.dumps({"ce_s0": {"checkpoint": True, "results": True},
                                     "gbg_s0": {"epochs": 0, "sleep": 60}}))
    monkeypatch.setenv("FAKE_PLAN", str(plan_file))
    args = repro.check_args(repro.get_args_parser().parse_args(
        ["--device", "cpu", "--python", str(script), "--runs", "ce,gbg", "--jobs", "2", "--epochs", "1",
         "--out", str(out)]))

    real_sleep = time.sleep
    monkeypatch.setattr(repro, "POLL_S", 0.125)  # run_all's sleep between polls, told from any other

    def interrupted(seconds):  # Ctrl-C once ce_s0 has exited, before run_all's poll sees it
        if seconds != 0.125:
            return real_sleep(seconds)
        while sorted(starts(out)) != ["ce_s0", "gbg_s0"] or not (out / "ce_s0" / "results.json").exists():
            real_sleep(0.05)
        real_sleep(1.0)
        raise KeyboardInterrupt
    monkeypatch.setattr(repro.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        repro.run_all(args, time.time())
    monkeypatch.undo()
    ce, gbg = (json.loads((out / n / "wall.json").read_text()) for n in ("ce_s0", "gbg_s0"))
    assert ce["exit_code"] == 0 and not (out / "ce_s0" / "checkpoint.pth").exists()
    assert repro.run_status(out / "ce_s0") == "done"
    assert gbg["exit_code"] == -9  # killed, and no checkpoint to resume from
    assert repro.run_status(out / "gbg_s0") == "unfinished (no checkpoint yet: the same command restarts it from zero)"


# --- Fix 7: the epochs a run kept ---------------------------------------------------------------------
def test_epochs_done_are_the_checkpoints_and_a_resumed_epoch_counts_once(tmp_path):
    # killed while saving epoch 3's checkpoint: log.txt has 0-3, the checkpoint epoch 2
    d = plant(tmp_path / "ce_s0", epochs=[0, 1, 2, 3], checkpoint=("checkpoint.pth", 2), wall={"exit_code": -9})
    assert repro.summarize_run(d)["epochs_done"] == 3
    (d / "checkpoint.pth").unlink()
    torch.save({"epoch": 1}, d / "checkpoint.prev.pth")
    assert repro.summarize_run(d)["epochs_done"] == 2
    # no checkpoint: the log's distinct epochs (epoch 1 logged again after a resume)
    d = plant(tmp_path / "gbg_s0", epochs=[0, 1, 1, 2], wall={"exit_code": 0}, results=True)
    assert repro.summarize_run(d)["epochs_done"] == 3


# --- Fix 1: the GPU plan counts the epochs left and leaves finished runs out ----------------------------
REPORT = {"steps": {"ce": {"images_per_s": 12000.0}, "gbg": {"images_per_s": 4000.0},
                    "bcl": {"images_per_s": 3000.0}}}  # tests/test_gpu_check.py's: ce 262 s, gbg 676 s at 200 epochs


def plan(tmp_path, monkeypatch, t_start, *argv):
    args = repro.check_args(repro.get_args_parser().parse_args(["--device", "cuda", "--out", str(tmp_path), *argv]))

    def fake_check(cmd, cwd):
        (tmp_path / "gpu_check").mkdir(exist_ok=True)
        (tmp_path / "gpu_check" / "report.json").write_text(json.dumps(REPORT))
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(subprocess, "run", fake_check)
    repro.gpu_check_first(args, t_start)
    monkeypatch.undo()
    return args


def test_the_gpu_plan_counts_what_earlier_calls_did(tmp_path, monkeypatch, capsys):
    plant(tmp_path / "ce_s0", epochs=range(200), wall={"exit_code": 0}, results=True)  # finished: not planned
    plant(tmp_path / "gbg_s0", epochs=range(150), checkpoint=("checkpoint.pth", 149), wall={"exit_code": -9})
    # gbg has 50 of 200 epochs left: 676 / 4 = 169 s, which fits in 500 - 10 s; all 200 would not
    args = plan(tmp_path, monkeypatch, time.time(), "--runs", "ce,gbg", "--budget", "500")
    assert args.planned_out == []
    args = plan(tmp_path, monkeypatch, time.time(), "--runs", "ce,gbg", "--budget", "150")
    assert args.planned_out == ["gbg_s0"]
    out = capsys.readouterr().out
    assert "gbg_s0: not resumed (planned out: needs 169 s of the GPU" in out and "kept for the next call" in out
    assert not (tmp_path / "gbg_s0" / "stop.json").exists() and (tmp_path / "gbg_s0" / "checkpoint.pth").exists()
    # the budget already spent: an unmeasured row is planned out too, in one line
    args = plan(tmp_path, monkeypatch, time.time() - 100, "--runs", "bcl_gbg", "--budget", "50")
    assert args.planned_out == ["bcl_gbg_s0"]
    assert "bcl_gbg_s0: not started (planned out: needs an unknown time of the GPU" in capsys.readouterr().out


# --- A review of repro.py: a row's mean is over seeds of one setting; a planned-out run's old files go
def test_a_seed_made_with_other_settings_than_the_rows_other_seeds_is_refused(tmp_path, fake):
    """ce_s0 at --epochs 4: a call for seed 1 alone at --epochs 5 into the same --out is refused
    (the row's mean would mix the two); at --epochs 4 it runs."""
    out = tmp_path / "out"
    assert call(fake, out, {"ce_s0": {"results": True}}, "--runs", "ce").returncode == 0
    r = call(fake, out, {"ce_s1": {"results": True}}, "--runs", "ce", "--seeds", "1", "--epochs", "5")
    assert r.returncode != 0 and r.stderr.startswith(f"repro.py: error: {out / 'ce_s0'} was made with other")
    assert "(--epochs 4; this call: --epochs 5)" in r.stderr and starts(out) == ["ce_s0"]
    r = call(fake, out, {"ce_s1": {"results": True}}, "--runs", "ce", "--seeds", "1")
    assert r.returncode == 0 and starts(out) == ["ce_s0", "ce_s1"], r.stdout + r.stderr


def test_include_refuses_a_second_run_of_a_seed_and_other_settings(tmp_path, fake):
    """--include: the same row and seed twice would make a 'mean of 2' of one seed (± 0.00); a run
    of another setting would be averaged with this folder's. A run call that makes the included
    row and seed here drops the included one, saying so."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert call(fake, a, {"ce_s0": {"results": True}}, "--runs", "ce").returncode == 0
    assert call(fake, b, {"ce_s0": {"results": True}, "ce_s1": {"results": True}}, "--runs", "ce",
                "--seeds", "0,1").returncode == 0
    assert call(fake, c, {"ce_s1": {"results": True}}, "--runs", "ce", "--seeds", "1", "--epochs", "5").returncode == 0
    summarize = lambda *inc: subprocess.run([sys.executable, str(SCRIPT), "--summarize", "--out", str(a), "--include",
                                             *map(str, inc)], capture_output=True, text=True)
    r = summarize(b / "ce_s0")
    assert r.returncode != 0 and "ce_s0 is ce with seed 0 already" in r.stderr and r.stderr.count("\n") == 1
    r = summarize(c / "ce_s1")
    assert r.returncode != 0 and "made with other train.py settings than ce_s0 (--epochs 5; ce_s0: --epochs 4)" in r.stderr
    r = summarize(b / "ce_s1")
    assert r.returncode == 0 and "| ce (mean of 2) |" in r.stdout, r.stderr
    r = call(fake, a, {"ce_s1": {"results": True}}, "--runs", "ce", "--seeds", "1")
    assert r.returncode == 0 and "table: the included ../b/ce_s1 leaves the table (this folder has" in r.stdout
    table = json.loads((a / "table.json").read_text())
    assert "included" not in table and [l["run"] for l in table["runs"]] == ["ce_s0", "ce_s1"]


def test_a_vanished_included_folder_does_not_cost_a_run_call_its_record(tmp_path, fake):
    a, b = tmp_path / "a", tmp_path / "b"
    call(fake, a, {"ce_s0": {"results": True}}, "--runs", "ce")
    call(fake, b, {"ce_s1": {"results": True}}, "--runs", "ce", "--seeds", "1")
    subprocess.run([sys.executable, str(SCRIPT), "--summarize", "--out", str(a), "--include", str(b / "ce_s1")],
                   check=True, capture_output=True)
    import shutil
    shutil.rmtree(b)
    r = call(fake, a, {"gbg_s0": {"results": True}}, "--runs", "gbg")
    assert r.returncode == 0 and "table: the included ../b/ce_s1 leaves the table (gone)" in r.stdout
    table = json.loads((a / "table.json").read_text())
    assert len(table["calls"]) == 2 and "included" not in table


def test_a_planned_out_run_leaves_no_earlier_status(tmp_path, monkeypatch, capsys):
    """A folder without a checkpoint that an earlier call left failed (exit 1): planned out now, it
    says 'not started', not the old failure (which would make this call exit 1)."""
    plant(tmp_path / "bcl_gbg_s0", epochs=[], wall={"exit_code": 1})
    args = plan(tmp_path, monkeypatch, time.time() - 100, "--runs", "bcl_gbg", "--budget", "50")
    assert args.planned_out == ["bcl_gbg_s0"]
    assert repro.run_status(tmp_path / "bcl_gbg_s0") == "not started"
    assert sorted(p.name for p in (tmp_path / "bcl_gbg_s0").iterdir()) == ["stop.json"]


def test_an_unknown_fp32_ratio_is_an_unknown_need_not_a_traceback(tmp_path):
    args = repro.check_args(repro.get_args_parser().parse_args(["--device", "cuda", "--out", str(tmp_path),
                                                                "--no-amp"]))
    for f in ({"skipped": "budget"}, {"ok": False, "error": "x"}, None):
        assert repro.run_seconds("ce", args, dict(REPORT, bench_f=f)) is None
    good = {"fp32": {"ce": 1.0, "exact": 1.0}, "bf16": {"ce": 2.0, "exact": 2.0}}
    assert repro.run_seconds("ce", args, dict(REPORT, bench_f=good)) > 0


def test_jobs_0_and_a_nan_budget_are_one_line(tmp_path):
    for argv, words in ((["--jobs", "0"], "--jobs 0 must be at least 1"), (["--budget", "nan"], "give a number")):
        r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "o"), *argv],
                           capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_a_hangup_ends_the_runs_too(tmp_path, fake):
    """The runs are in sessions of their own: a SIGHUP to repro.py (a closed terminal or session)
    must end them as SIGTERM does, or the next call would start a second train.py in a folder the
    first still writes."""
    import signal
    script, plan_file, data = fake
    out = tmp_path / "out"
    plan_file.write_text(json.dumps({"ce_s0": {"sleep": 120, "pidfile": True}}))
    env = dict(os.environ, FAKE_PLAN=str(plan_file), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--device", "cpu", "--python", str(script), "--data", str(data),
                          "--out", str(out), "--epochs", "4", "--runs", "ce"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pidfile, deadline = out / "ce_s0" / "pid", time.time() + 60
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    child = int(pidfile.read_text())
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=60) == 129
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "X"
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the run outlived repro.py's hangup")
