"""README's commands, run as written. Every command in README's code blocks either runs
here, verbatim (bash -c with the text README shows), in a copy of the checkout whose data the test
makes, or is skipped with the reason it cannot run on a CPU machine without data sets: real data,
GPUs, a SLURM cluster. A command README gains that no rule below covers fails the test until it is
given a check or a reason."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(python|torchrun|bash|pip|squeue|tail|OMP_NUM_THREADS=\S+ python)\b")


def readme_commands(text):
    """The commands of README's shell code blocks (``` fenced, or indented by 4 spaces), each with its
    continuation lines, as README shows it."""
    commands, fence, lang, pending = [], False, "", None
    for line in text.splitlines():
        if line.startswith("```"):
            fence, lang = not fence, line[3:].strip()
            continue
        if fence and lang not in ("bash", "sh", ""):
            continue
        body = line if fence else line[4:] if line.startswith("    ") else None
        if body is None or (pending is None and not COMMAND.match(body.strip())):
            continue
        pending = body.strip() if pending is None else pending + "\n" + body
        if not body.rstrip().endswith("\\"):
            commands.append(pending)
            pending = None
    return commands


def normal(command):
    """One line, without its comment: how the rules below name a command."""
    return " ".join(command.replace("\\\n", " ").split(" #")[0].split())


# What a command needs that this machine does not have, first match wins.
SKIP = [
    (r"^pip install ", "installs packages: the suite runs in the environment it made"),
    (r"^python -m pytest", "the test suite itself"),
    (r"/tmp/cifar10", "the CIFAR-10 JPEG copy (real data), and 20 min to hours on a CPU"),
    (r"^python tests/repro\.py (?!--summarize)", "the CIFAR-10 JPEG tarball in .data/ (real data), and hours"),
    (r"^torchrun ", "several GPUs and ImageNet-LT or iNaturalist 2018 (real data)"),
    (r"--gpus-per-node [1-9]", "GPUs and ImageNet-LT (real data)"),
    (r"^bash slurm/\S+\.sh$", "submits to a SLURM cluster"),
    (r"^(squeue|tail) ", "a job on a SLURM cluster"),
    (r"^python train\.py (?!.*--dataset (synthetic-lt|folder-lt))", "CIFAR-10/100 (downloaded into ./data) and "
                                                                    "200-300 epochs, for a GPU"),
]


def env():
    """A `python` first on PATH that is this interpreter; no shared job folder (a fresh machine)."""
    e = {k: v for k, v in os.environ.items() if k not in ("GBG_JOB_ROOT", "SCRATCH")}
    return dict(e, OMP_NUM_THREADS="1")


def checkout(tmp_path):
    """A copy of the code README's commands run, and a `python` that is this interpreter."""
    for name in ("train.py", "gbg.py", "data_lt.py", "slurm/submit.py", "slurm/imagenet_lt.sh", "slurm/inat2018.sh",
                 "tests/repro.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "bin").mkdir()
    # A script that execs this interpreter, not a symlink to it: a virtualenv's python found through a
    # symlink elsewhere no longer sees the venv's pyvenv.cfg and runs without the venv's packages.
    python = tmp_path / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    return tmp_path


def bash(command, cwd, timeout=900):
    e = env()
    e["PATH"] = f"{cwd / 'bin'}:{e['PATH']}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------ what runs, and what it must do
def demo(tmp_path, command):
    """The CPU demo (about a minute) learns: its last epoch is well above chance (10 %), as README shows."""
    r = bash(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(tmp_path / "runs" / "demo" / "results.json"))
    assert results["last"]["top1"] >= 40, results["last"]
    shown = README.split("The last command is a CPU demo")[1].split("```")[1].splitlines()  # what README shows it print
    assert shown[0] == "text" and shown[1].startswith("run: ") and shown[2].startswith("data: ")
    assert shown[-1].startswith("done: ")
    printed = r.stdout.splitlines()
    cores = re.compile(r"workers \d+")  # the default --workers follows the machine's core count
    assert cores.sub("workers N", shown[1]) in [cores.sub("workers N", line) for line in printed]
    assert shown[2] in printed  # the run's flags and its data, as README shows them
    # the lines that do not depend on timing, as README shows them: the groups and the accuracies
    steady = [line for line in shown if line.startswith(("groups (", "  group "))]
    assert steady and all(line in printed for line in steady)
    accuracies = [line.split(";")[0] for line in shown if re.match(r"epoch \d+: test", line)]
    assert accuracies and all(any(p.startswith(a + ";") for p in printed) for a in accuracies)


def summarize(tmp_path, command):
    """The CPU miniature's table rebuilt from its committed run folders alone (a fresh clone has no
    others) is the table README quotes from, and the folder is left as it was (a clean tree)."""
    shutil.copytree(ROOT / "results" / "cpu_miniature", tmp_path / "results" / "cpu_miniature")
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    r = bash(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == (ROOT / "results" / "cpu_miniature" / "table.md").read_text()
    assert {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()} == before


def plots(tmp_path, command):
    """The pictures README shows, drawn again from the committed run folders: one PNG per figure."""
    pytest.importorskip("matplotlib", reason="tests/plot_runs.py draws with matplotlib (pip install matplotlib)")
    shutil.copy2(ROOT / "tests" / "plot_runs.py", tmp_path / "tests" / "plot_runs.py")
    shutil.copytree(ROOT / "results" / "cpu_miniature", tmp_path / "results" / "cpu_miniature",
                    ignore=shutil.ignore_patterns("plots"))
    r = bash(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    drawn = sorted(p.name for p in (tmp_path / "results" / "cpu_miniature" / "plots").glob("*.png"))
    committed = sorted(p.name for p in (ROOT / "results" / "cpu_miniature" / "plots").glob("*.png"))
    assert drawn and drawn == committed


def dry_run(tmp_path, command):
    """Off the cluster, with no shared folder and no data: both ImageNet-LT jobs are printed, under
    two job names, and nothing is written."""
    before = files(tmp_path)
    r = bash(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    names = re.findall(r"^#SBATCH --job-name=(\S+)$", r.stdout, re.M)
    assert len(names) == 2 and len(set(names)) == 2, names
    assert r.stderr.count("nothing submitted") == 2 and "no shared folder" in r.stderr
    assert files(tmp_path) == before


def local_job(tmp_path, command):
    """Two CPU processes through submitit's LocalExecutor, to the end, in the checkout's runs/gbg."""
    r = bash(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    done = re.search(r"job (\d+) done: (\S+)/results.json", r.stdout)
    assert done, r.stdout[-3000:]
    folder = tmp_path / "runs" / "gbg" / done.group(1)
    assert Path(done.group(2)) == folder
    results = json.load(open(folder / "results.json"))
    assert results["args"]["world_size"] == 2 and results["last"]["top1"] is not None


RUN = {
    "python train.py --dataset synthetic-lt --arch resnet8 --epochs 5 --warmup-epochs 1 --batch-size 64 "
    "--output-dir runs/demo": demo,
    "python tests/repro.py --summarize --out results/cpu_miniature": summarize,
    "bash slurm/imagenet_lt.sh --dry-run": dry_run,
    "python tests/plot_runs.py results/cpu_miniature/{ce_s0,gbg_s0,ce_s1,gbg_s1,release_ce_s0,regroup_s0} --labels CE "
    "CE+GBG+MOO CE CE+GBG+MOO \"release rule on CE\" \"CE+GBG+MOO, regrouped every 20\" --class-names "
    "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck --smooth 5 --out results/cpu_miniature/plots": plots,
    "python slurm/submit.py --cluster local --dataset synthetic-lt --device cpu --arch resnet8 --gpus-per-node 0 "
    "--tasks-per-node 2 --epochs 1": local_job,
}
README = (ROOT / "README.md").read_text()
COMMANDS = readme_commands(README)


def test_every_command_that_runs_here_is_in_readme():
    found = {normal(c) for c in COMMANDS}
    assert len(COMMANDS) > 20  # the parser finds README's blocks
    for command in RUN:
        assert command in found, command


def test_readme_python_is_this_interpreter(tmp_path):
    """README's `python` in the checkout is this interpreter with its environment (a virtualenv's
    packages included): same sys.prefix, same torch."""
    r = bash("python -c 'import sys, torch; print(sys.prefix); print(torch.__file__)'", checkout(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    assert r.stdout.splitlines() == [sys.prefix, torch.__file__]


@pytest.mark.parametrize("command", COMMANDS, ids=[normal(c)[:60] for c in COMMANDS])
def test_readme_command(command, tmp_path):
    check = RUN.get(normal(command))
    if check is None:
        reason = next((why for rule, why in SKIP if re.search(rule, normal(command))), None)
        assert reason is not None, f"README command with neither a check nor a reason to skip: {command}"
        pytest.skip(reason)
    check(checkout(tmp_path), command)
