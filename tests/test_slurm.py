"""slurm/submit.py without a cluster: the sbatch script of --dry-run (and of the cluster options:
--gres, --slurm-opt, --wckey, --mem-gb 0, CPUs from a stand-in sinfo); a submission to stand-in
srun/sbatch commands (the script sbatch gets is the dry run's, the pickled Trainer re-submits
itself and runs a snapshot of the code); a two-task folder-lt job with DataLoader workers run
through submitit's LocalExecutor, to the end, and through USR2 sent to every process of the job
with the newest checkpoint lost and the checkout edited, to the same weights; what train.py does
for clusters (workers that ignore USR2/TERM, the GPU of each task, durable checkpoints and the
fallback to the previous one); and the one-line errors for requests that can't work."""
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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
def fake_sinfo(bin_dir, cpus_per_node):
    """sinfo stand-in: `sinfo --noheader --format=%c` lists the CPUs of each node group."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sinfo").write_text("#!/bin/bash\nprintf '%s\\n' " + " ".join(map(str, cpus_per_node)) + "\n")
    (bin_dir / "sinfo").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_dry_run_prints_the_sbatch_script_it_was_given(tmp_path):
    shared = {"GBG_JOB_ROOT": "/shared/jobs"}  # never created: a dry run writes nothing
    override = ["--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--timeout", "600",
                "--partition", "learnlab", "--signal-delay-s", "100"]
    # the partition's nodes have 64 and 48 CPUs: 4 tasks per node get 48 // 4 = 12 each
    inet = subprocess.Popen(["bash", str(ROOT / "slurm" / "imagenet_lt.sh"), *override],
                            env=env(PATH=fake_sinfo(tmp_path / "bin", [64, 48]), **shared),
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
        assert (f["cpus-per-task"], f["mem"]) == ("12", "0")  # all of each node's memory
        assert "wckey" not in f and "gres" not in f  # submitit's own default would add --wckey=submitit
        assert f["output"] == "/shared/jobs/gbg/%j/%j_0_log.out" and "requeue" in f
        command = [l for l in script.splitlines() if l.startswith("srun ")]
        assert len(command) == 1 and command[0].endswith("-m submitit.core._submit /shared/jobs/gbg/%j")
        assert " --kill-on-bad-exit=1 " in command[0]  # a dead rank ends the step, not NCCL's watchdog
    # what each task would run: the preset's training flags, from the job's code snapshot
    runs = [l for l in err.splitlines() if "nothing submitted" in l]
    assert len(runs) == 2
    for line, arch in zip(runs, ["resnet50", "resnext50_32x4d"]):
        assert f"--arch {arch}" in line and "--dataset imagenet-lt" in line and "--amp" in line
        assert "12 CPUs per task (sinfo: 48 CPUs per node)" in line and "/shared/jobs/gbg/%j/code" in line
    # the iNat preset as written (no sinfo here): one node of 8 GPUs, one task per GPU, 24 h
    rc, out, err = finish(inat)
    assert rc == 0, err
    f = sbatch_flags(out)
    assert (f["nodes"], f["gpus-per-node"], f["ntasks-per-node"], f["partition"]) == ("1", "8", "8", "gpu")
    assert f["signal"] == "USR2@120" and f["time"] == "1440" and f["mem"] == "0"
    if not shutil.which("sinfo"):
        assert f["cpus-per-task"] == "10" and "sinfo gave no CPU count" in err
    assert "--dataset inat2018" in err and "--arch resnet50" in err
    assert not Path("/shared/jobs").exists()


def test_dry_run_cluster_options(tmp_path, monkeypatch, capsys):
    """--gres instead of --gpus-per-node, --slurm-opt, --wckey, --mem-gb and the private-API guard."""
    submit_py = load_submit()
    monkeypatch.setenv("PATH", fake_sinfo(tmp_path / "bin", [96]))
    argv = ["--dataset", "synthetic-lt", "--dry-run", "--job-dir", "/shared/x/%j", "--gres", "gpu:a100:4",
            "--slurm-opt", "exclusive", "--slurm-opt", "mail-type=END", "--slurm-opt", "time=2880",
            "--wckey", "proj", "--mem-gb", "500", "--batch-size", "64"]
    submit_py.main(submit_py.get_args_parser().parse_args(argv))
    out, err = capsys.readouterr()
    f = sbatch_flags(out)
    assert f["gres"] == "gpu:a100:4" and "gpus-per-node" not in f and f["ntasks-per-node"] == "4"
    assert f["exclusive"] == "" and f["mail-type"] == "END" and f["time"] == "2880"  # --slurm-opt wins
    assert f["wckey"] == "proj" and f["mem"] == "500G" and f["cpus-per-task"] == "24"  # 96 CPUs / 4 tasks
    # fractional GB in MB
    submit_py.main(submit_py.get_args_parser().parse_args(argv + ["--mem-gb", "1.5"]))
    assert sbatch_flags(capsys.readouterr().out)["mem"] == "1536M"
    # the dry run's one use of submitit internals: another release gets one line, not a traceback
    import submitit
    monkeypatch.setattr(submitit, "__version__", "2.0.0")
    with pytest.raises(submit_py.SubmitError) as e:
        submit_py.main(submit_py.get_args_parser().parse_args(argv))
    assert "submitit 2.0.0" in str(e.value) and "submitit>=1.5.4,<1.6" in str(e.value)
    monkeypatch.undo()
    monkeypatch.delattr(submitit.slurm.slurm, "_make_sbatch_string")
    with pytest.raises(submit_py.SubmitError) as e:
        submit_py.main(submit_py.get_args_parser().parse_args(argv))
    assert "AttributeError" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_dry_run_rounds_the_time_up_and_prints_a_train_command_that_parses(tmp_path, monkeypatch, capsys):
    """--timeout 30.5 asks sbatch for 31 minutes (SLURM takes whole minutes; fewer would end the job
    before the limit asked for); the training flags the dry run prints are a train.py command line
    that gives back the job's flags (--no-recalibrate-bn, not '--recalibrate-bn False')."""
    submit_py = load_submit()
    monkeypatch.setenv("PATH", fake_sinfo(tmp_path / "bin", [8]))
    argv = ["--dry-run", "--job-dir", "/shared/x/%j", "--timeout", "30.5", "--dataset", "folder-lt", "--data-root",
            "/data/my images", "--no-recalibrate-bn", "--lr-drops", "3", "5", "--amp", "--seed", "2"]
    args = submit_py.get_args_parser().parse_args(argv)
    submit_py.main(args)
    out, err = capsys.readouterr()
    assert sbatch_flags(out)["time"] == "31"
    line = [l for l in err.splitlines() if "nothing submitted" in l][0]
    flags = line.split("would run train.py ")[1].split(" from a copy of the code")[0]
    import shlex
    import train as T
    parsed = vars(T.get_args_parser().parse_args(shlex.split(flags)))
    expected = vars(T.get_args_parser().parse_args(argv[5:]))
    assert parsed == expected and parsed["recalibrate_bn"] is False and parsed["data_root"] == "/data/my images"


def test_slurm_submission_writes_the_dry_run_script_and_a_requeueable_trainer(tmp_path, monkeypatch, capsys):
    submit_py = load_submit()
    monkeypatch.setattr(submit_py, "NODE_LOCAL", ())  # tmp_path is under /tmp
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin", 'echo "Submitted batch job 4242"'))
    argv = ["--dataset", "synthetic-lt", "--nodes", "2", "--gpus-per-node", "4", "--partition", "p1",
            "--timeout", "90", "--job-dir", str(tmp_path / "jobs" / "%j"), "--epochs", "7", "--cpus-per-task", "6",
            "--workers", "4"]
    args = submit_py.get_args_parser().parse_args(argv)
    submit_py.main(args)
    out = capsys.readouterr().out
    folder = tmp_path / "jobs" / "4242"
    assert f"job 4242: logs, checkpoints and results in {folder}" in out and "squeue -j 4242" in out
    # what went to sbatch is what --dry-run prints for the same flags
    dry = submit_py.get_args_parser().parse_args(argv + ["--dry-run"])
    submit_py.main(dry)
    sent = (folder / "4242_submission.sh").read_text()
    assert sent.strip() == capsys.readouterr().out.strip()
    assert [l for l in sent.splitlines() if l.startswith("srun ")][0].count("--kill-on-bad-exit=1") == 1
    # the code the job runs: a copy taken at submission, in the job folder (nothing left beside it)
    for name in submit_py.CODE:
        assert (folder / "code" / name).read_bytes() == (ROOT / name).read_bytes(), name
    assert not list((tmp_path / "jobs").glob(".code-*"))
    # the pickled Trainer carries the flags and the snapshot, and its checkpoint() re-submits the same
    import submitit
    delayed = submitit.core.utils.DelayedSubmission.load(folder / "4242_submitted.pkl")
    trainer = delayed.function
    assert (trainer.args.epochs, trainer.args.nodes, trainer.args.output_dir) == (7, 2, None)
    assert trainer.code_dir == str(tmp_path / "jobs" / "%j" / "code")
    again = trainer.checkpoint()
    assert type(again.function) is type(trainer) and vars(again.function.args) == vars(trainer.args)
    assert again.function.code_dir == trainer.code_dir
    # without --workers (the task fills it in from its cores, as train.py would): submitted the same
    assert argv[-2:] == ["--workers", "4"]
    submit_py.main(submit_py.get_args_parser().parse_args(argv[:-2] + ["--job-dir", str(tmp_path / "jobs2" / "%j")]))
    capsys.readouterr()
    delayed = submitit.core.utils.DelayedSubmission.load(tmp_path / "jobs2" / "4242" / "4242_submitted.pkl")
    assert delayed.function.args.workers is None
    # sbatch refusing the job, or answering without a job id: one line that says so, nothing left
    refusals = {"bin2": ('echo "sbatch: error: Batch job submission failed: Requested time limit is invalid" >&2; '
                         'exit 1', "Requested time limit is invalid"),
                "bin3": ('echo "sbatch: queued, maybe"', "Could not make sense of sbatch output")}  # FailedSubmissionError
    for bin_dir, (body, words) in refusals.items():
        monkeypatch.setenv("PATH", fake_slurm(tmp_path / bin_dir, body))
        with pytest.raises(submit_py.SubmitError) as e:
            submit_py.main(submit_py.get_args_parser().parse_args(argv))
        assert words in str(e.value) and len(str(e.value).splitlines()) == 1
        assert str(e.value).startswith("sbatch refused the job")
        assert capsys.readouterr().err == ""
        assert not list((tmp_path / "jobs").glob(".code-*"))  # no snapshot left behind
    # with --output-dir, train.py's files go there and the messages say so; submitit's logs stay
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin4", 'echo "Submitted batch job 4343"'))
    outdir = tmp_path / "run"
    submit_py.main(submit_py.get_args_parser().parse_args(argv + ["--job-dir", str(tmp_path / "jobs3" / "%j"),
                                                                  "--output-dir", str(outdir)]))
    out, folder = capsys.readouterr().out, tmp_path / "jobs3" / "4343"
    assert f"job 4343: logs in {folder}, checkpoints and results in {outdir}" in out
    assert f"tail -f {folder}/4343_0_log.out; cat {outdir}/log.txt" in out and f"{folder}/log.txt" not in out


def test_a_local_job_ends_with_its_accuracy(tmp_path, monkeypatch, capsys):
    """--cluster local and debug wait for the job: their last line gives the run's accuracies (read
    from results.json, as train.py's own last line), not only where the file is."""
    submit_py = load_submit()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        submit_py.main(submit_py.get_args_parser().parse_args(
            ["--cluster", "debug", "--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu",
             "--gpus-per-node", "0", "--cpus-per-task", "1", "--workers", "0", "--batch-size", "512", "--epochs", "1",
             "--grouping", "none", "--moo", "none", "--sampler", "random", "--print-freq", "1000",
             "--output-dir", str(out), "--job-dir", str(tmp_path / "jobs" / "%j")]))
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    results = json.load(open(out / "results.json"))
    top1 = f"{results['last']['top1']:.2f}"
    assert re.fullmatch(rf"job \S+ done: {re.escape(str(out))}/results.json; last epoch: test top-1 {top1}; best test "
                        rf"epoch: test top-1 {top1} \(epoch 0\)", last), last


def test_a_resubmission_with_other_cluster_flags_resumes(tmp_path, monkeypatch, capsys):
    """The Trainer hands train.py its own flags only: a job resubmitted into the same --output-dir
    with another --timeout, --nodes or --partition resumes (the checkpoint holds no cluster flag),
    one with another --lr is still refused. The task runs here, in a stand-in job environment;
    with --cluster debug (one of them) the job's last line names --output-dir's results.json."""
    import submitit
    import data_lt
    from types import SimpleNamespace
    submit_py = load_submit()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the Trainer sets it (and torch's threads) from its cores
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--device", "cpu", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--workers", "0", "--batch-size", "512", "--epochs", "3", "--grouping", "none",
            "--moo", "none", "--sampler", "random", "--print-freq", "1000", "--output-dir", str(out)]
    try:
        submit_py.main(submit_py.get_args_parser().parse_args(
            ["--cluster", "debug", *argv, "--job-dir", str(tmp_path / "jobs" / "%j"), "--timeout", "60",
             "--exit-after-epoch", "0"]))
        printed = capsys.readouterr().out
        job = printed.split("job ", 1)[1].split(":", 1)[0]
        assert f"job {job}: logs in {tmp_path / 'jobs' / job}, checkpoints and results in {out}" in printed
        assert f"job {job} done: {out}/results.json" in printed
        ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 0 and "timeout" not in ckpt["args"] and "nodes" not in ckpt["args"]
        monkeypatch.setattr(submitit, "JobEnvironment",
                            lambda: SimpleNamespace(cluster="debug", job_id="2", num_tasks=1, global_rank=0))

        def task(*more):
            args = submit_py.get_args_parser().parse_args(argv + ["--job-dir", str(tmp_path / "jobs" / "%j"), *more])
            return submit_py.Trainer(args)()
        assert task("--timeout", "120", "--nodes", "2", "--partition", "other", "--exit-after-epoch", "1") is None
        printed = capsys.readouterr().out
        assert f"resumed from {out / 'checkpoint.pth'} at epoch 1" in printed, printed
        with pytest.raises(data_lt.UserError, match="--lr"):
            task("--lr", "0.5")
        results = task("--timeout", "30")
        assert results["last"]["epoch"] == 2 and not {"timeout", "nodes", "partition"} & set(results["args"])
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ local
def job_folder(job_root):
    found = [d for d in job_root.iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(found) == 1, found
    return found[0]


def parents():
    """{pid: parent pid} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        try:
            out[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):  # not a process, or gone
            continue
    return out


def task_pids(job_dir):
    """The job's task processes: their command line names the job folder (with its %j). Their
    forked DataLoader workers have the same command line, and one of those as parent."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if b"submitit.core._submit" in argv and str(job_dir).encode() in argv:
            pids.append(int(d))
    ppid = parents()
    return [p for p in pids if ppid.get(p) not in pids]


def descendants(pids):
    ppid = parents()
    found, todo = [], list(pids)
    while todo:
        kids = [p for p, q in ppid.items() if q in todo]
        found += kids
        todo = kids
    return found


def image_folder(root, size=72, per_class=(6, 2), classes=3):
    """A folder-lt tree of PNG files larger than 64 px, so that they are read from disk by
    DataLoader workers (smaller ones are decoded into one tensor)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                tint = np.roll([100, 60, 20], k)
                Image.fromarray((rng.random((size, size, 3)) * 120 + tint).astype(np.uint8)).save(folder / f"{i}.png")
    return root


# Two CPU processes (gloo), CE on 13 + 6 images of 72 px read by 2 DataLoader workers per process
# (224-px crops), resnet8, 3 epochs: ~2-3 s an epoch.
FOLDER = ["--dataset", "folder-lt", "--imb-factor", "2", "--arch", "resnet8", "--device", "cpu",
          "--gpus-per-node", "0", "--tasks-per-node", "2", "--batch-size", "6", "--epochs", "3",
          "--grouping", "count", "--num-groups", "2", "--moo", "none", "--print-freq", "1000", "--workers", "2"]


def test_local_job_survives_usr2_to_every_process_a_lost_checkpoint_and_an_edited_checkout(tmp_path):
    # Job a runs undisturbed. Job b (alongside, to share the wait) is submitted from a checkout
    # of its own. Once epoch 1's checkpoint is written, as after a node failure its newest
    # checkpoint is emptied, the checkout's train.py and gbg.py are broken (an edit during the run),
    # and USR2 goes to every process of the job, DataLoader workers included, as SLURM signals
    # before a time limit. The job must requeue once (rank 0 alone checkpoints), resume from the
    # previous checkpoint (epoch 0) on both ranks with the code it was submitted with, and end
    # with job a's weights.
    data = str(image_folder(tmp_path / "data"))
    checkout = tmp_path / "checkout"
    for name in ["train.py", "gbg.py", "data_lt.py", "slurm/submit.py"]:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, checkout / name)
    pa = submit("--cluster", "local", *FOLDER, "--data-root", data, "--job-dir", str(tmp_path / "a" / "%j"))
    job_dir = tmp_path / "b" / "%j"
    pb = subprocess.Popen([sys.executable, str(checkout / "slurm" / "submit.py"), "--cluster", "local", *FOLDER,
                           "--data-root", data, "--job-dir", str(job_dir)], cwd=checkout, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    newest = prev = None
    while time.time() < deadline:
        found = list((tmp_path / "b").glob("[0-9]*/checkpoint.prev.pth"))
        if found:
            prev, newest = found[0], found[0].with_name("checkpoint.pth")
            if newest.exists():
                break
        assert pb.poll() is None, pb.communicate()[1][-3000:]
        time.sleep(0.01)
    pids = task_pids(job_dir)
    assert len(pids) == 2
    while time.time() < deadline and len(descendants(pids)) < 4:  # epoch 2's workers have started
        time.sleep(0.01)
    # (not while the tasks fork: CPython drops an exception raised in a signal handler that runs
    # in the parent's at-fork hooks, so submitit's exit to requeue a local job would be lost)
    time.sleep(0.2)
    newest.write_bytes(b"")
    for name in ["train.py", "gbg.py"]:
        with open(checkout / name, "a") as f:
            f.write('\nraise SystemExit("edited during the run")\n')
    tree = pids + descendants(pids)
    assert len(tree) >= 4  # two tasks and their workers
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)

    rc, out, err = finish(pa, timeout=200)
    assert rc == 0, err[-3000:]
    a = job_folder(tmp_path / "a")
    assert f"done: {a}/results.json" in out
    assert [json.loads(l)["epoch"] for l in open(a / "log.txt")] == [0, 1, 2]
    assert json.load(open(a / "results.json"))["last"]["top1"] is not None
    assert (a / f"{a.name}_0_log.out").exists() and (a / f"{a.name}_1_log.out").exists()  # one log per task
    log0 = (a / f"{a.name}_0_log.out").read_text()
    assert "over 2 processes" in log0
    # per-task threads: this machine's cores shared by the 2 tasks, less 2 workers each
    threads = max(1, os.cpu_count() // 2 - 2)
    assert f"task 0: {threads} thread(s) (OMP_NUM_THREADS)" in log0 and f"code from {a}/code" in log0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [a.name]  # no folder named %j

    rc, out, err = finish(pb, timeout=200)
    assert rc == 0, err[-3000:]
    b = job_folder(tmp_path / "b")
    log0 = (b / f"{b.name}_0_log.out").read_text() + (b / f"{b.name}_0_log.err").read_text()
    assert log0.count("Calling checkpoint method") == 1 and log0.count(f"Requeued job {b.name}") == 1
    assert "edited during the run" not in log0 and f"code from {b}/code" in log0
    tail = log0[-4000:]
    assert f"train.py: warning: cannot read {newest}" in log0, tail
    assert f"resuming from {prev} (epoch 0)" in log0 and f"resumed from {prev} at epoch 1" in log0, tail
    log1 = (b / f"{b.name}_1_log.out").read_text() + (b / f"{b.name}_1_log.err").read_text()
    assert "Not checkpointing nor requeuing" in log1 and "Calling checkpoint method" not in log1
    assert [json.loads(l)["epoch"] for l in open(b / "log.txt")] == [0, 1, 2]  # a redone epoch is logged once
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [b.name]
    wa = torch.load(a / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------------------ train.py on clusters
def report_signals(folder):
    """In a DataLoader worker: write down what this process does with USR2 and TERM."""
    if torch.utils.data.get_worker_info() is not None:
        seen = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR2, signal.SIGTERM)]
        (folder / f"{os.getpid()}").write_text(" ".join("ignored" if s else "handled" for s in seen))


class SignalReport(torch.utils.data.Dataset):
    """Small images whose loading reports the worker's signal handling."""

    def __init__(self, folder, n=4, size=8):
        self.folder, self.targets = folder, [i % 2 for i in range(n)]
        self.x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        report_signals(self.folder)
        return self.x[i], self.targets[i]


def test_every_loader_leaves_usr2_and_term_to_the_training_process(tmp_path):
    # The task's handlers, as submitit sets them; then each kind of loader train.py makes, with
    # two workers: what each worker does with the signals, and that none is left idle afterwards.
    import data_lt
    import train
    from types import SimpleNamespace

    calls = []
    old = {s: signal.signal(s, lambda *a: calls.append(a)) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        def workers_of(make, name):
            folder = tmp_path / name
            folder.mkdir()
            before = set(descendants([os.getpid()]))
            kept = make(folder)  # the loader, still referenced, as train.py keeps its test loader
            reports = [p.read_text() for p in folder.iterdir()]
            assert len(reports) == 2 and set(reports) == {"ignored ignored"}, (name, reports)
            # no idle workers stay behind once a pass is over (evaluation loaders used to keep theirs)
            assert set(descendants([os.getpid()])) <= before, name
            del kept

        def one_pass(loader):
            list(loader)
            return loader

        batches = [[0, 1], [2, 3]]
        for train_mode in (True, False):
            workers_of(lambda f: one_pass(data_lt.make_loader(SignalReport(f), batches, train=train_mode, device="cpu",
                                                              num_workers=2)), f"train={train_mode}")
        # BCL's views of image files
        files = image_folder(tmp_path / "images", size=8, per_class=(2, 1), classes=2)
        ds = data_lt.ImageList(str(files), None, 2, samples=[(f"train/c{i % 2}/{i // 2}.png", i % 2) for i in range(4)])
        view = lambda f: (lambda img: (report_signals(f), torch.zeros(1))[1])
        workers_of(lambda f: one_pass(data_lt.make_loader(ds, batches, train=True, device="cpu", num_workers=2, seed=1,
                                                          views=[view(f), view(f)])), "views")
        # grouping: train.make_groups -> gbg.class_gradients, with its own DataLoader
        args = SimpleNamespace(num_groups=2, grouping="gbg", sketch_dim=0, grad_max_per_class=None, seed=0, rank=0,
                               world_size=1, distributed=False, workers=2, recalibrate_bn=False, ncut_assign="kmeans")
        model = train.build_model("resnet8", 2)
        workers_of(lambda f: train.make_groups(model, SimpleNamespace(train_eval=SignalReport(f), num_classes=2,
                                                                      kind="files", class_counts=np.array([2, 2])),
                                               args, torch.device("cpu")),
                   "grouping")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert calls == []


def test_forked_children_leave_the_task_signals_to_it(tmp_path):
    # submitit's handlers stand-in, then the guard a task installs over them: a child forked at
    # any moment (before a loader's worker_init_fn runs, or not a worker at all) does nothing.
    submit_py = load_submit()
    ran = tmp_path / "ran"
    record = lambda signum, frame: ran.open("a").write(f"{os.getpid()} {signum}\n")
    old = {s: signal.signal(s, record) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        submit_py.leave_signals_to_task()
        child = os.fork()
        if child == 0:  # the child: signalled with the rest of the job
            for s in (signal.SIGUSR2, signal.SIGTERM):
                os.kill(os.getpid(), s)
            time.sleep(0.05)
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert not ran.exists()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert ran.read_text() == f"{os.getpid()} {int(signal.SIGUSR2)}\n"  # the task's own still acts
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_each_task_takes_its_own_gpu_among_those_it_sees(monkeypatch):
    import train
    from types import SimpleNamespace

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group here
    # 8 tasks on a node of 8 GPUs (two sockets of 4). What task r is shown: all 8, its own one
    # (--gpu-bind=single:1 / map_gpu), or its socket's 4 (--gpu-bind=closest). Its GPU is global
    # GPU r, at that position in the list it sees.
    bindings = {"all": lambda r: list(range(8)), "one": lambda r: [r], "closest": lambda r: list(range(r // 4 * 4, r // 4 * 4 + 4))}
    for name, visible in bindings.items():
        for r in range(8):
            monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible(r)))
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setenv("RANK", str(r))
            monkeypatch.setenv("WORLD_SIZE", "8")
            monkeypatch.setenv("LOCAL_RANK", str(r))
            args = SimpleNamespace(device="cuda")
            train.init_distributed(args)
            assert args.device == f"cuda:{visible(r).index(r)}" and chosen[-1] == visible(r).index(r), (name, r)


def test_checkpoints_are_synced_and_the_previous_one_is_the_fallback(tmp_path, monkeypatch, capsys):
    import data_lt
    import train
    from types import SimpleNamespace

    path = tmp_path / "checkpoint.pth"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file", st.st_ino))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", Path(a).name, Path(b).name))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for epoch in range(3):
        events.clear()
        train.save_atomic({"epoch": epoch, "w": torch.full((3,), float(epoch))}, path)
    monkeypatch.undo()
    # the data is on disk before the name points at it; the renames are synced with the folder
    assert events == [("fsync", "file", path.stat().st_ino), ("replace", "checkpoint.pth", "checkpoint.prev.pth"),
                      ("replace", "checkpoint.pth.tmp", "checkpoint.pth"), ("fsync", "dir", tmp_path.stat().st_ino)]
    prev = tmp_path / "checkpoint.prev.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]
    args = SimpleNamespace(rank=0, world_size=1, distributed=False)
    ckpt, where = train.load_resume_checkpoint(path, args)
    assert (ckpt["epoch"], where) == (2, path) and capsys.readouterr().err == ""
    # the newest lost (a node failure: empty, or cut short): the previous one, with a warning
    for damage in (b"", path.read_bytes()[:100]):
        path.write_bytes(damage)
        ckpt, where = train.load_resume_checkpoint(path, args)
        assert (ckpt["epoch"], where) == (1, prev) and torch.equal(ckpt["w"], torch.ones(3))
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"train.py: warning: cannot read {path}") and len(err.splitlines()) == 1
        assert f"resuming from {prev} (epoch 1)" in err
    # both unreadable: one line, and nothing is started afresh over them
    prev.write_bytes(b"")
    with pytest.raises(data_lt.UserError) as e:
        train.load_resume_checkpoint(path, args)
    assert str(path) in str(e.value) and str(prev) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert prev.stat().st_size == 0 and path.stat().st_size == 100
    # nothing to resume from
    assert train.load_resume_checkpoint(tmp_path / "new" / "checkpoint.pth", args) == (None, None)


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
        "no tasks": (local + ["--tasks-per-node", "0"], ["--tasks-per-node must be >= 1"]),
        "gres without a count": (["--dry-run", "--job-dir", "/shared/x/%j", "--gres", "gpu:a100"],
                                 ["--gres gpu:a100", "gpu:TYPE:N"]),
        "gres against gpus": (["--dry-run", "--job-dir", "/shared/x/%j", "--gres", "gpu:2", "--gpus-per-node", "4"],
                              ["--gres gpu:2", "--gpus-per-node"]),
        "bad sbatch option": (["--dry-run", "--job-dir", "/shared/x/%j", "--slurm-opt", "mail type=END"],
                              ["--slurm-opt 'mail type=END'", "KEY=VALUE"]),
        "empty sbatch value": (["--dry-run", "--job-dir", "/shared/x/%j", "--slurm-opt", "qos="], ["--slurm-opt 'qos='"]),
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
