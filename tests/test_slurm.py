"""slurm/submit.py without a cluster: the sbatch script of --dry-run; a submission to stand-in
srun/sbatch commands (the script sbatch gets is the dry run's, the pickled Trainer re-submits
itself); a two-task job run through submitit's LocalExecutor, to the end and through a USR2
requeue to the same weights; and the one-line errors for requests that can't work."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Two CPU processes (the gloo path), CE on synthetic-lt, GAC over count groups: ~3 s an epoch.
TINY = ["--dataset", "synthetic-lt", "--device", "cpu", "--gpus-per-node", "0", "--tasks-per-node", "2",
        "--batch-size", "64", "--epochs", "2", "--grouping", "count", "--moo", "none", "--sampler", "gac",
        "--eval-every", "2", "--print-freq", "1000", "--workers", "0"]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("GBG_JOB_ROOT", "SCRATCH")}
    e.update(OMP_NUM_THREADS="1", **extra)
    return e


def submit(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "slurm" / "submit.py"), *args], cwd=kw.pop("cwd", ROOT),
                            env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def sbatch_flags(script):
    """{'nodes': '2', ...} from the '#SBATCH --key=value' lines."""
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def load_submit():
    """slurm/submit.py as a module (slurm/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gbg_submit", ROOT / "slurm" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_slurm(bin_dir, sbatch_body):
    """srun and sbatch stand-ins on PATH: submitit looks for srun, then runs `sbatch <script>`."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/bash\n" + sbatch_body + "\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_prints_the_sbatch_script_it_was_given():
    shared = {"GBG_JOB_ROOT": "/shared/jobs"}  # never created: a dry run writes nothing
    override = ["--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--timeout", "600",
                "--partition", "learnlab", "--signal-delay-s", "100"]
    inet = subprocess.Popen(["bash", str(ROOT / "slurm" / "imagenet_lt.sh"), *override], env=env(**shared),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inat = subprocess.Popen(["bash", str(ROOT / "slurm" / "inat2018.sh"), "--dry-run"], env=env(**shared),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc, out, err = finish(inet)
    assert rc == 0, err
    scripts = ["#!/bin/bash" + s for s in out.split("#!/bin/bash")[1:]]
    assert len(scripts) == 2  # ResNet-50 and ResNeXt-50
    for script in scripts:
        f = sbatch_flags(script)
        assert (f["nodes"], f["gpus-per-node"], f["ntasks-per-node"]) == ("2", "4", "4")
        assert (f["time"], f["partition"], f["signal"]) == ("600", "learnlab", "USR2@100")
        assert f["output"] == "/shared/jobs/gbg/%j/%j_0_log.out" and "requeue" in f
        command = [l for l in script.splitlines() if l.startswith("srun ")]
        assert len(command) == 1 and command[0].endswith("-m submitit.core._submit /shared/jobs/gbg/%j")
    # what each task would run: the preset's training flags
    runs = [l for l in err.splitlines() if "nothing submitted" in l]
    assert len(runs) == 2
    for line, arch in zip(runs, ["resnet50", "resnext50_32x4d"]):
        assert f"--arch {arch}" in line and "--dataset imagenet-lt" in line and "--amp" in line
    # the iNat preset as written: one node of 8 GPUs, one task per GPU, its partition variable
    rc, out, err = finish(inat)
    assert rc == 0, err
    f = sbatch_flags(out)
    assert (f["nodes"], f["gpus-per-node"], f["ntasks-per-node"], f["partition"]) == ("1", "8", "8", "gpu")
    assert f["signal"] == "USR2@120" and f["time"] == "4320"
    assert "--dataset inat2018" in err and "--arch resnet50" in err
    assert not Path("/shared/jobs").exists()


def test_slurm_submission_writes_the_dry_run_script_and_a_requeueable_trainer(tmp_path, monkeypatch, capsys):
    submit_py = load_submit()
    monkeypatch.setattr(submit_py, "NODE_LOCAL", ())  # tmp_path is under /tmp
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin", 'echo "Submitted batch job 4242"'))
    argv = ["--dataset", "synthetic-lt", "--nodes", "2", "--gpus-per-node", "4", "--partition", "p1",
            "--timeout", "90", "--job-dir", str(tmp_path / "jobs" / "%j"), "--epochs", "7"]
    args = submit_py.get_args_parser().parse_args(argv)
    submit_py.main(args)
    out = capsys.readouterr().out
    folder = tmp_path / "jobs" / "4242"
    assert f"job 4242: logs, checkpoints and results in {folder}" in out and "squeue -j 4242" in out
    # what went to sbatch is what --dry-run prints for the same flags
    dry = submit_py.get_args_parser().parse_args(argv + ["--dry-run"])
    submit_py.main(dry)
    assert (folder / "4242_submission.sh").read_text().strip() == capsys.readouterr().out.strip()
    # the pickled Trainer carries the flags, and its checkpoint() re-submits the same Trainer
    import submitit
    delayed = submitit.core.utils.DelayedSubmission.load(folder / "4242_submitted.pkl")
    trainer = delayed.function
    assert (trainer.args.epochs, trainer.args.nodes, trainer.args.output_dir) == (7, 2, None)
    again = trainer.checkpoint()
    assert type(again.function) is type(trainer) and vars(again.function.args) == vars(trainer.args)
    # sbatch refusing the job: one line that says so, with sbatch's reason
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin2", 'echo "sbatch: error: Batch job submission failed: '
                                          'Requested time limit is invalid" >&2; exit 1'))
    with pytest.raises(submit_py.SubmitError) as e:
        submit_py.main(submit_py.get_args_parser().parse_args(argv))
    assert "Requested time limit is invalid" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ local
def job_folder(job_root):
    found = [d for d in job_root.iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(found) == 1, found
    return found[0]


def task_pids(job_dir):
    """The job's task processes: their command line names the job folder (with its %j)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if b"submitit.core._submit" in argv and str(job_dir).encode() in argv:
            pids.append(int(d))
    return pids


def test_local_job_runs_to_the_end_and_a_requeued_one_ends_the_same(tmp_path):
    # Job a runs undisturbed. Job b (alongside, to share the wait) gets USR2 on every task once
    # epoch 0's checkpoint exists, as SLURM signals before a time limit: submitit calls
    # Trainer.checkpoint() on rank 0 and requeues, and the job resumes and finishes.
    pa = submit("--cluster", "local", *TINY, "--job-dir", str(tmp_path / "a" / "%j"))
    job_dir = tmp_path / "b" / "%j"
    pb = submit("--cluster", "local", *TINY, "--job-dir", str(job_dir))
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "b").glob("[0-9]*/checkpoint.pth")):
        assert pb.poll() is None, pb.communicate()[1][-3000:]
        time.sleep(0.02)
    pids = task_pids(job_dir)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)

    rc, out, err = finish(pa)
    assert rc == 0, err[-3000:]
    a = job_folder(tmp_path / "a")
    assert f"done: {a}/results.json" in out
    assert [json.loads(l)["epoch"] for l in open(a / "log.txt")] == [0, 1]
    assert json.load(open(a / "results.json"))["last"]["top1"] is not None
    assert (a / f"{a.name}_0_log.out").exists() and (a / f"{a.name}_1_log.out").exists()  # one log per task
    assert "over 2 process(es)" in (a / f"{a.name}_0_log.out").read_text()

    rc, out, err = finish(pb)
    assert rc == 0, err[-3000:]
    b = job_folder(tmp_path / "b")
    log0 = (b / f"{b.name}_0_log.out").read_text() + (b / f"{b.name}_0_log.err").read_text()
    assert "Calling checkpoint method" in log0 and f"Requeued job {b.name}" in log0
    assert f"resumed from {b}/checkpoint.pth" in log0
    assert [json.loads(l)["epoch"] for l in open(b / "log.txt")] == [0, 1]  # a redone epoch is logged once
    wa = torch.load(a / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------------------ errors
def test_bad_cluster_input_fails_before_training_with_one_line(tmp_path, monkeypatch):
    local = ["--cluster", "local", "--dataset", "synthetic-lt", "--device", "cpu", "--gpus-per-node", "0",
             "--job-dir", str(tmp_path / "jobs" / "%j")]
    missing = str(tmp_path / "missing")
    cases = {  # name: (command line, words the error must name)
        "no shared job dir": (["--dataset", "synthetic-lt"], ["--job-dir", "GBG_JOB_ROOT"]),
        "node-local job dir": (["--job-dir", str(tmp_path / "jobs" / "%j")], ["node-local", "--job-dir"]),
        "no srun": (["--job-dir", "/shared/nowhere/%j"], ["srun", "--cluster local"]),
        "too many GPUs": (local + ["--gpus-per-node", "64"], ["--gpus-per-node 64", "GPU"]),
        "no data root": (local + ["--dataset", "imagenet-lt", "--data-root", missing], [missing, "--data-root"]),
        "batch not divisible": (local + ["--tasks-per-node", "3", "--batch-size", "64"], ["--batch-size"]),
        "two nodes locally": (local + ["--nodes", "2"], ["--nodes 1"]),
    }
    if shutil.which("srun"):  # on a SLURM login node that line would really submit
        del cases["no srun"]
    # no $GBG_JOB_ROOT, $SCRATCH or /checkpoint/$USER: nowhere shared to put the job
    for var in ("GBG_JOB_ROOT", "SCRATCH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOGNAME", "gbg-test-nobody")
    # One of them end to end: exit code, a single stderr line, no traceback.
    procs = {name: submit(*cases[name][0], env=env(LOGNAME="gbg-test-nobody")) for name in ["no data root"]}
    submit_py = load_submit()
    for name, (argv, words) in cases.items():
        args = submit_py.get_args_parser().parse_args(argv)
        with pytest.raises(submit_py.SubmitError) as e:
            submit_py.main(args)
        message = str(e.value)
        assert len(message.splitlines()) == 1, (name, message)
        for word in words:
            assert word in message, (name, word, message)
    for name, p in procs.items():
        rc, out, err = finish(p, timeout=120)
        assert rc != 0, name
        err = err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, (name, err)
        assert err.startswith("submit.py: error: ") and cases[name][1][0] in err, (name, err)
    assert not (tmp_path / "jobs").exists()  # nothing was submitted
