"""Put train.py on a SLURM cluster with submitit, one process per GPU, preemption-safe.

    python slurm/submit.py --dataset imagenet-lt --data-root /datasets/imagenet_lt --amp \
        --nodes 1 --gpus-per-node 8 --partition gpu           # submit; prints the job id
    python slurm/submit.py ... --dry-run                      # print the sbatch script, submit nothing
    python slurm/submit.py --cluster local --dataset synthetic-lt --device cpu \
        --gpus-per-node 0 --tasks-per-node 2 --epochs 2      # the same job on this machine, waits for it

Every train.py flag works here too (the parser extends train.py's). The job folder (--job-dir,
default $GBG_JOB_ROOT, $SCRATCH or /checkpoint/$USER, then gbg/%j with %j the job id) holds
submitit's logs and pickles, a copy of the code taken at submission (code/: every run and
requeue of the job runs it, not the checkout) and train.py's outputs (log.txt, groups.json,
checkpoint.pth and checkpoint.prev.pth, results.json). It must be on a file system that every
node sees.

Time limits and preemption: SLURM sends USR2 --signal-delay-s seconds before the limit to every
process of the job. submitit's handler runs in every task: on global rank 0 it calls
Trainer.checkpoint(), which re-submits the same Trainer, and requeues the job under the same id;
the other ranks log the signal and go on until the requeue stops them. (DataLoader workers ignore
the signal: data_lt.worker_init.) The requeued job finds checkpoint.pth in the same folder and
resumes.
"""
import argparse
import contextlib
import copy
import getpass
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # train.py, gbg.py and data_lt.py live in the repository root
    sys.path.insert(0, ROOT)

import submitit  # noqa: E402
import torch  # noqa: E402

import data_lt  # noqa: E402
import train  # noqa: E402

NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm")  # folders other nodes can't see
NEEDS_DATA_ROOT = ("imagenet-lt", "inat2018", "folder-lt")  # CIFAR downloads; synthetic-lt needs none
CODE = ["train.py", "gbg.py", "data_lt.py", "slurm/submit.py"]  # what a job runs: copied into <job folder>/code
# The dry run prints submitit's sbatch template through a private function (sbatch_text); it was
# checked against these releases (requirements.txt pins them).
SUBMITIT_TESTED = "1.5."
DRY_RUN_ROOT = "/path/to/shared"  # what a dry run without a shared folder shows in its place
CPUS_PER_TASK = 10  # when sinfo can't say: DeiT's and DINO's run_with_submitit (10 per GPU)


def get_args_parser():
    """submit.py's flags: the cluster's first, then every train.py flag (train.add_train_arguments)."""
    p = argparse.ArgumentParser(prog="submit.py", formatter_class=train.HelpFormatter,
                                usage="python slurm/%(prog)s [--partition P] [--nodes N] [--gpus-per-node G] "
                                      "[train.py flags] ... (the flags below)",
                                description=__doc__.split("\n\n")[0])
    c = p.add_argument_group("cluster")
    c.add_argument("--partition", default=None, help="sbatch --partition (default: the cluster's)")
    c.add_argument("--nodes", type=int, default=1, help="nodes, each running --tasks-per-node processes")
    c.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: 8, a common GPU node, or the count in --gres)")
    c.add_argument("--gres", default=None,
                   help="ask for the GPUs as a generic resource instead, e.g. gpu:a100:8 (clusters that "
                        "want a GPU type); the last number is the GPUs per node")
    c.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, 1 without GPUs)")
    c.add_argument("--cpus-per-task", type=int, default=None,
                   help=f"CPU cores per process (default: the partition's CPUs per node from sinfo, split "
                        f"over the tasks; {CPUS_PER_TASK} when sinfo can't tell). --workers should stay below it")
    c.add_argument("--timeout", type=float, default=24 * 60,
                   help="time limit in minutes (default 1440: most partitions allow 24-48 h, and the job is "
                        "requeued and resumes when it runs out; fractions work locally)")
    c.add_argument("--job-dir", default=None,
                   help="shared folder for logs and checkpoints, %%j = job id (default: $GBG_JOB_ROOT, "
                        "$SCRATCH or /checkpoint/$USER, then gbg/%%j)")
    c.add_argument("--account", default=None, help="sbatch --account")
    c.add_argument("--qos", default=None, help="sbatch --qos")
    c.add_argument("--constraint", default=None, help="sbatch --constraint, e.g. volta32gb")
    c.add_argument("--mem-gb", type=float, default=0,
                   help="memory per node in GB (default 0: all of the node's memory, sbatch --mem=0)")
    c.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="local: the same job on this machine through submitit's LocalExecutor (to try a "
                        "job before queueing it); debug: in this process, one task (pdb works)")
    c.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    c.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the limit, to save and requeue")
    c.add_argument("--max-timeouts", type=int, default=20, help="requeues after time-outs before giving up")
    c.add_argument("--wckey", default=None, help="sbatch --wckey (default: none; submitit's own default is 'submitit')")
    c.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable: --slurm-opt exclusive --slurm-opt mail-type=END "
                        "gives #SBATCH --exclusive and --mail-type=END (it overrides the options set above)")
    train.add_train_arguments(p)
    p.set_defaults(output_dir=None)  # None: the job folder
    return p


class SubmitError(Exception):
    """A problem with the cluster request: one line naming it and the fix."""


# --- What runs on the nodes -----------------------------------------------------------------------
def leave_signals_to_task():
    """Make submitit's USR2 (checkpoint and requeue) and TERM handlers act in this process only.

    SLURM signals every process of the job, and a forked child (a DataLoader worker) inherits
    the handlers: it would checkpoint and requeue too, or exit under the task's loader. Loaders
    reset the signals in their workers (data_lt.worker_init), but only once the worker has
    started; this guard covers the moment between the fork and then, and any other child."""
    task = os.getpid()
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            signal.signal(sig, lambda signum, frame, handler=handler: handler(signum, frame)
                          if os.getpid() == task else None)


class Trainer:
    """The submitted callable, run once per task (process). Picklable: it holds the args and the
    folder of the code snapshot (None: the checkout, as with --cluster debug)."""

    def __init__(self, args, code_dir=None):
        self.args, self.code_dir = args, code_dir

    def __call__(self):
        env = submitit.JobEnvironment()
        if env.cluster != "debug":
            leave_signals_to_task()
        args = copy.deepcopy(self.args)
        folder = args.job_dir.replace("%j", str(env.job_id))
        train_py = self.import_train(str(env.job_id))
        # The folder name holds the job id, which a requeued job keeps: it resumes in place.
        args.output_dir = args.output_dir or folder
        if env.cluster == "local" and "%j" in args.job_dir:
            # submitit's local controller creates the folder with a literal %j before it starts
            # the tasks (on every requeue too); nothing goes there, so take the empty folder away
            with contextlib.suppress(OSError):
                os.rmdir(args.job_dir)
        # Intra-op threads of this process: the task's cores less the DataLoader workers (one
        # core each; PyTorch runs them single-threaded). Set per task here, so that tasks sharing
        # a node don't each start one thread per core of the whole node.
        cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or args.cpus_per_task or 1
        if args.workers is None:  # train.py's default (the cores this process may use, at most 8), the task's
            args.workers = min(cores, 8)
        threads = max(1, cores - args.workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        print(f"task {env.global_rank}: {threads} thread(s) (OMP_NUM_THREADS) for {cores} core(s) and "
              f"{args.workers} DataLoader worker(s); code from {os.path.dirname(train_py.__file__)}", flush=True)
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for init_process_group("env://");
            # every task keeps the GPUs it was given and train.py takes LOCAL_RANK modulo their count.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if env.cluster == "local":  # the hostname need not resolve in a container
                os.environ["MASTER_ADDR"] = "127.0.0.1"
        # train.py's flags only: the cluster's (--timeout, --nodes, --partition, ...) would go into
        # the checkpoint's args, and a resubmission with another time limit or size would be
        # refused as another run (a change of world size is one train.py allows)
        flags = vars(train_py.get_args_parser().parse_args([]))
        return train_py.main(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in flags}))

    def import_train(self, job_id):
        """train.py from the job's code snapshot (from the checkout without one)."""
        code = ROOT
        if self.code_dir is not None:
            code = self.code_dir.replace("%j", job_id)
            # submit.py moves the snapshot into the job folder right after sbatch answers; a job
            # that starts at once can be a moment ahead of it
            deadline = time.time() + 300
            while not os.path.isfile(os.path.join(code, "train.py")):
                if time.time() > deadline:
                    raise RuntimeError(f"the code snapshot {code} never appeared; submit the job again")
                time.sleep(0.5)
        for name in ("train", "gbg", "data_lt"):  # never a copy imported from elsewhere
            module = sys.modules.get(name)
            if module is not None and os.path.dirname(os.path.realpath(module.__file__)) != os.path.realpath(code):
                del sys.modules[name]
        sys.path.insert(0, code)
        import train as train_py  # imported here, so that unpickling the Trainer needs no sys.path
        return train_py

    def checkpoint(self):
        # Called by submitit on global rank 0 when USR2 arrives (time limit or preemption).
        # train.py writes checkpoint.pth at the end of every epoch and resumes from it on start,
        # so the requeued job redoes at most the epoch that was running, with the same code.
        return submitit.helpers.DelayedSubmission(type(self)(self.args, self.code_dir))


# --- What runs on the submitting machine ----------------------------------------------------------
def parse_gres(args):
    """--gres and --gpus-per-node -> GPUs per node (--gres gpu:a100:8 -> 8)."""
    if args.gres is None:
        return 8 if args.gpus_per_node is None else args.gpus_per_node
    m = re.fullmatch(r"gpu(:[\w.-]+)?:(\d+)", args.gres)
    if m is None:
        raise SubmitError(f"--gres {args.gres}: write the GPUs as gpu:N or gpu:TYPE:N (e.g. gpu:a100:8)")
    gpus = int(m.group(2))
    if args.gpus_per_node is not None and args.gpus_per_node != gpus:
        raise SubmitError(f"--gres {args.gres} asks for {gpus} GPUs per node but --gpus-per-node is "
                          f"{args.gpus_per_node}; drop --gpus-per-node")
    return gpus


def parse_slurm_opts(args):
    """--slurm-opt KEY=VALUE / KEY -> {key: value or True}, in submitit's names (_ for -)."""
    opts = {}
    for opt in args.slurm_opt:
        key, eq, value = opt.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[a-zA-Z][\w-]*", key) or (eq and not value):
            raise SubmitError(f"--slurm-opt {opt!r}: write an sbatch option as KEY=VALUE or KEY "
                              f"(e.g. --slurm-opt mail-type=END, --slurm-opt exclusive)")
        opts[key.replace("-", "_")] = value if eq else True
    return opts


def node_cpus(partition):
    """CPUs per node of the partition (the smallest node's), from sinfo; None if it can't say."""
    command = ["sinfo", "--noheader", "--format=%c"] + (["--partition", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(m) for m in re.findall(r"\d+", out)]
    return min(counts) if counts else None


def fill_cluster_defaults(args):
    """The defaults that depend on the request: GPUs, CPUs per task (with where they came from)."""
    args.gpus_per_node = parse_gres(args)
    if args.cpus_per_task is not None:
        return "--cpus-per-task"
    tasks = tasks_per_node(args)
    if args.cluster == "slurm":
        cpus = node_cpus(args.partition)
        where = f"sinfo: {cpus} CPUs per node" if cpus else "the default: sinfo gave no CPU count"
    else:
        cpus, where = os.cpu_count(), f"{os.cpu_count()} CPUs on this machine"
    args.cpus_per_task = max(1, cpus // max(tasks, 1)) if cpus else CPUS_PER_TASK  # tasks < 1: check_request says so
    return where


def tasks_per_node(args):
    return args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)


def resolve_job_dir(args):
    """Absolute job folder, %j left in for submitit to fill with the job id."""
    job_dir = args.job_dir
    if job_dir is None:
        roots = [os.environ.get("GBG_JOB_ROOT"), os.environ.get("SCRATCH")]
        roots += [r for r in [f"/checkpoint/{getpass.getuser()}"] if os.path.isdir(r)]
        if args.cluster != "slurm":
            roots.append(os.path.join(ROOT, "runs"))
        root = next((r for r in roots if r), None)
        if root is None:
            problem = ("no shared folder for the job: pass --job-dir on a file system every node sees, or set "
                       "GBG_JOB_ROOT (or SCRATCH)")
            if not args.dry_run:
                raise SubmitError(problem)
            # a dry run writes nothing: it shows the script with the folder still to be chosen
            print(f"submit.py: warning: {problem}; the script shows it as {DRY_RUN_ROOT}", file=sys.stderr)
            return os.path.join(DRY_RUN_ROOT, "gbg", "%j")
        job_dir = os.path.join(root, "gbg", "%j")
    job_dir = os.path.abspath(os.path.expanduser(os.path.expandvars(job_dir)))
    if args.cluster == "slurm" and any(job_dir == d or job_dir.startswith(d + "/") for d in NODE_LOCAL):
        problem = (f"--job-dir {job_dir} is on a node-local disk that the compute nodes can't see; pass --job-dir "
                   f"on a shared file system, or set GBG_JOB_ROOT")
        if not args.dry_run:
            raise SubmitError(problem)
        print(f"submit.py: warning: {problem}", file=sys.stderr)
    return job_dir


def check_request(args):
    """Everything that would otherwise fail on the node, after the wait in the queue."""
    world = args.nodes * tasks_per_node(args)
    if min(args.nodes, tasks_per_node(args)) < 1 or args.gpus_per_node < 0:
        raise SubmitError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
    if args.mem_gb < 0 or args.cpus_per_task < 1:
        raise SubmitError("--mem-gb must be >= 0 (0: all of the node's memory) and --cpus-per-task >= 1")
    if args.timeout * 60 <= args.signal_delay_s:
        raise SubmitError(f"--signal-delay-s {args.signal_delay_s} leaves no time before the "
                          f"{args.timeout:g}-minute limit; raise --timeout or lower --signal-delay-s")
    probe = copy.copy(args)
    probe.world_size = world
    try:
        train.fill_defaults(probe)  # the batch must split evenly over the processes
    except data_lt.UserError as e:
        raise SubmitError(str(e)) from None
    if args.cluster == "debug" and world > 1:
        raise SubmitError(f"--cluster debug runs one task in this process, not {world}; use --cluster local")
    if args.cluster == "local":
        if args.nodes > 1:
            raise SubmitError(f"--cluster local runs on this machine only: use --nodes 1 (got {args.nodes})")
        have = torch.cuda.device_count()
        if args.gpus_per_node > have:
            raise SubmitError(f"--gpus-per-node {args.gpus_per_node} but this machine has {have} GPU(s); "
                              f"lower --gpus-per-node (0 with --device cpu runs on the CPU)")
    if args.dataset in NEEDS_DATA_ROOT and not os.path.isdir(probe.data_root):
        raise SubmitError(f"data root {probe.data_root} does not exist on this machine; pass --data-root "
                          f"pointing at the {args.dataset} folder (on a file system the nodes see)")


def slurm_mem(gb):
    """sbatch --mem: 0 is all of the node's memory; whole GB as G, anything else in MB."""
    return "0" if gb == 0 else f"{int(gb)}G" if gb == int(gb) else f"{math.ceil(gb * 1024)}M"


def job_name(args):
    """gbg-<dataset>-<arch>[-bcl]: the jobs of one script (ResNet-50 and ResNeXt-50 on ImageNet-LT)
    apart in squeue, with the architecture and base method train.py will fill in."""
    run = copy.copy(args)
    run.world_size = 1
    with contextlib.suppress(data_lt.UserError):  # a bad flag is reported by check_request
        train.fill_defaults(run)
    return "-".join(["gbg", args.dataset] + [run.arch] * bool(run.arch) + ["bcl"] * (run.loss == "bcl"))


def slurm_parameters(args):
    """sbatch options, in submitit.SlurmExecutor's names (its public update_parameters)."""
    gpus, tasks = args.gpus_per_node, tasks_per_node(args)
    params = dict(job_name=job_name(args), nodes=args.nodes, ntasks_per_node=tasks,
                  gpus_per_node=None if args.gres else gpus or None, gres=args.gres,
                  cpus_per_task=args.cpus_per_task, mem=slurm_mem(args.mem_gb),
                  time=max(1, math.ceil(args.timeout)), signal_delay_s=args.signal_delay_s,
                  partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                  wckey=args.wckey,  # None drops submitit's "--wckey=submitit", which clusters may reject
                  # a rank that dies ends the step at once, instead of the others waiting in a
                  # collective until NCCL's watchdog (minutes to hours); the job then fails and can
                  # be submitted again, and resumes from its checkpoint
                  srun_args=["--kill-on-bad-exit=1"],
                  # requeueable even where the cluster's default says no (JobRequeue=0): submitit's
                  # requeue on USR2 and SLURM's own after a preemption or node failure need it
                  additional_parameters=dict(requeue=True, **parse_slurm_opts(args)))
    params = {k: v for k, v in params.items() if v is not None or k == "wckey"}
    for key in list(params["additional_parameters"]):  # --slurm-opt wins over the options above
        if key in params and key != "additional_parameters":
            params[key] = params["additional_parameters"].pop(key)
    return params


def sbatch_text(args):
    """The script SlurmExecutor would submit (same template, same command), for --dry-run.

    submitit has no public way to render its sbatch script without submitting, so this is the one
    place that uses its internals (the template function and the command of SlurmExecutor), as in
    the releases SUBMITIT_TESTED names. tests/test_slurm.py checks that a submission sends sbatch
    exactly this text."""
    version = getattr(submitit, "__version__", "unknown")
    fix = (f"--dry-run uses submitit {SUBMITIT_TESTED}x's internal sbatch template and this is submitit "
           f"{version}; pip install 'submitit>=1.5.4,<1.6' (requirements.txt), or submit without --dry-run")
    if not version.startswith(SUBMITIT_TESTED):
        raise SubmitError(fix)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(args.job_dir)}"
    try:
        return submitit.slurm.slurm._make_sbatch_string(command=command, folder=args.job_dir,
                                                        **slurm_parameters(args))
    except (AttributeError, TypeError) as e:
        raise SubmitError(f"{fix} ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def train_flags(args):
    """The train.py flags that differ from train.py's defaults, as a command line."""
    defaults = vars(train.get_args_parser().parse_args([]))
    flags = []
    for k, v in vars(args).items():
        if k in defaults and v is not None and v != defaults[k]:
            name = k.replace("_", "-")
            if isinstance(v, bool):  # --amp; --recalibrate-bn / --no-recalibrate-bn (BooleanOptionalAction)
                flags.append(f"--{name}" if v else f"--no-{name}")
            else:
                flags.append(f"--{name} " + " ".join(shlex.quote(str(x)) for x in (v if isinstance(v, list) else [v])))
    return " ".join(flags)


def failure_cause(error):
    """The last line of the job's traceback (submitit puts it between two dashed lines)."""
    parts = str(error).split("-" * 22)
    text = parts[1] if len(parts) > 2 else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def snapshot_code(parent):
    """Copy the code a job runs (CODE) into a new folder under parent, for the job to run from:
    a requeued job would otherwise import train.py from the checkout as it is days later."""
    staging = Path(tempfile.mkdtemp(prefix=".code-", dir=parent))
    for name in CODE:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), staging / name)
    try:  # which commit it came from, for the record
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *CODE], capture_output=True,
                               text=True, timeout=10)
        if rev.returncode == 0:
            edits = " plus uncommitted edits" if dirty.stdout.strip() else ""
            (staging / "SOURCE").write_text(f"{ROOT} at {rev.stdout.strip()}{edits}\n")
    except (OSError, subprocess.SubprocessError):
        pass
    return staging


def place_snapshot(staging, code, consequence):
    """Move the snapshot to <job folder>/code (one rename: a job never sees half of it)."""
    try:
        code.parent.mkdir(parents=True, exist_ok=True)
        if code.exists():  # an earlier submission's, in a reused --job-dir: this one's code replaces it
            shutil.rmtree(code)
        os.replace(staging, code)
    except OSError as e:
        raise SubmitError(f"cannot move the code snapshot to {code} ({e.strerror}); {consequence}") from None


def make_executor(args):
    if args.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=args.job_dir, max_num_timeout=args.max_timeouts)
        executor.update_parameters(**slurm_parameters(args))
    elif args.cluster == "local":
        executor = submitit.LocalExecutor(folder=args.job_dir, max_num_timeout=args.max_timeouts)
        executor.update_parameters(timeout_min=args.timeout, gpus_per_node=args.gpus_per_node,
                                   tasks_per_node=tasks_per_node(args), nodes=1,
                                   signal_delay_s=args.signal_delay_s)
    else:
        executor = submitit.DebugExecutor(folder=args.job_dir)
    return executor


def main(args):
    args.job_dir = resolve_job_dir(args)
    cpus_from = fill_cluster_defaults(args)
    if args.dry_run:
        try:
            check_request(args)
        except SubmitError as e:  # the script is still worth seeing
            print(f"submit.py: warning: {e}", file=sys.stderr)
        print(sbatch_text(args))
        print(f"submit.py: dry run, nothing submitted; {args.cpus_per_task} CPUs per task ({cpus_from}); each "
              f"task would run train.py {train_flags(args)} from a copy of the code in "
              f"{os.path.join(args.job_dir, 'code')}", file=sys.stderr)
        return
    check_request(args)
    if args.cluster == "slurm" and submitit.SlurmExecutor.affinity() < 0:
        raise SubmitError("no srun here: submit from a SLURM login node, or use --cluster local or --dry-run")
    if args.cluster == "slurm" and args.workers is not None and args.workers > args.cpus_per_task:
        print(f"submit.py: warning: --workers {args.workers} leaves no core of the {args.cpus_per_task} per task "
              f"to the training process; lower --workers or raise --cpus-per-task", file=sys.stderr)
    parent = Path(args.job_dir.split("%j")[0])
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = snapshot_code(parent) if args.cluster != "debug" else None
    except OSError as e:
        raise SubmitError(f"cannot write the job folder {parent} ({e.strerror}); pass a writable --job-dir")
    code_dir = None if staging is None else os.path.join(args.job_dir, "code")
    if staging is not None and "%j" not in args.job_dir:  # the folder is known: in place before the job starts
        place_snapshot(staging, Path(code_dir), "the job is not submitted")
        staging = None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's complaint; we name it once
            job = make_executor(args).submit(Trainer(args, code_dir))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = " ".join(str(e).split())[:300]
        raise SubmitError(f"sbatch refused the job: {reason}; check --partition, --timeout, --account and "
                          f"--qos against the cluster's limits (sinfo, sacctmgr show qos)") from None
    folder = args.job_dir.replace("%j", str(job.job_id))
    if staging is not None:
        place_snapshot(staging, Path(code_dir.replace("%j", str(job.job_id))),
                       f"job {job.job_id} is queued but cannot run: cancel it (scancel {job.job_id}) and submit again")
    out = args.output_dir or folder  # where train.py writes: --output-dir when given (see Trainer)
    if out == folder:
        print(f"job {job.job_id}: logs, checkpoints and results in {folder}", flush=True)
    else:  # submitit's logs stay in the job folder
        print(f"job {job.job_id}: logs in {folder}, checkpoints and results in {out}", flush=True)
    if args.cluster == "slurm":
        print(f"follow it with: squeue -j {job.job_id}; tail -f {folder}/{job.job_id}_0_log.out; "
              f"cat {out}/log.txt")
        return
    try:  # local and debug: wait, so the command ends when the job does
        job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        raise SubmitError(f"job {job.job_id} failed: {failure_cause(e)}; full log: {job.paths.stderr}") from None
    try:  # the run's accuracies, as train.py's last line gives them (none when it stopped early)
        summary = "; " + train.results_line(json.load(open(os.path.join(out, "results.json"))))
    except (OSError, ValueError, KeyError):
        summary = ""
    print(f"job {job.job_id} done: {out}/results.json{summary}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (SubmitError, data_lt.UserError) as e:
        sys.exit(f"submit.py: error: {e}")
