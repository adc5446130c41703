"""Put train.py on a SLURM cluster with submitit, one process per GPU, preemption-safe.

    python slurm/submit.py --dataset imagenet-lt --data-root /datasets/imagenet_lt --amp \
        --nodes 1 --gpus-per-node 8 --partition gpu           # submit; prints the job id
    python slurm/submit.py ... --dry-run                      # print the sbatch script, submit nothing
    python slurm/submit.py --cluster local --dataset synthetic-lt --device cpu \
        --gpus-per-node 0 --tasks-per-node 2 --epochs 2      # the same job on this machine, waits for it

Every train.py flag works here too (the parser extends train.py's). The job folder (--job-dir,
default $GBG_JOB_ROOT, $SCRATCH or /checkpoint/$USER, then gbg/%j with %j the job id) holds
submitit's logs and pickles and train.py's outputs (log.txt, groups.json, checkpoint.pth,
results.json). It must be on a file system that every node sees.

Time limits and preemption: SLURM sends USR2 --signal-delay-s seconds before the limit; submitit
then calls Trainer.checkpoint() on rank 0, which re-submits the same Trainer, and requeues the
job under the same id. The requeued job finds checkpoint.pth in the same folder and resumes.
"""
import argparse
import contextlib
import copy
import getpass
import io
import math
import os
import shlex
import sys
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


def get_args_parser():
    p = argparse.ArgumentParser("Submit GBG training with submitit", parents=[train.get_args_parser()])
    p.set_defaults(output_dir=None)  # None: the job folder
    c = p.add_argument_group("cluster")
    c.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="local: the same job on this machine through submitit's LocalExecutor (to try a "
                        "job before queueing it); debug: in this process, one task (pdb works)")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, 1 without GPUs)")
    c.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per process; keep --workers below it")
    c.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: 40 GB per GPU, min 16)")
    c.add_argument("--timeout", type=float, default=72 * 60,
                   help="time limit in minutes; the job is requeued when it runs out (fractions work locally)")
    c.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the limit, to save and requeue")
    c.add_argument("--max-timeouts", type=int, default=20, help="requeues after time-outs before giving up")
    c.add_argument("--partition", default=None)
    c.add_argument("--account", default=None)
    c.add_argument("--qos", default=None)
    c.add_argument("--constraint", default=None, help="e.g. volta32gb")
    c.add_argument("--job-dir", default=None,
                   help="shared folder for logs and checkpoints, %%j = job id (default: $GBG_JOB_ROOT, "
                        "$SCRATCH or /checkpoint/$USER, then gbg/%%j)")
    c.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    return p


class SubmitError(Exception):
    """A problem with the cluster request: one line naming it and the fix."""


# --- What runs on the nodes -----------------------------------------------------------------------
class Trainer:
    """The submitted callable, run once per task (process). Picklable: it only holds the args."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        import train as train_py  # imported here, so that unpickling the Trainer needs no sys.path

        env = submitit.JobEnvironment()
        args = copy.deepcopy(self.args)
        # The folder name holds the job id, which a requeued job keeps: it resumes in place.
        args.output_dir = args.output_dir or args.job_dir.replace("%j", str(env.job_id))
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for init_process_group("env://");
            # every task keeps all of the node's GPUs and train.py picks cuda:LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if env.cluster == "local":  # the hostname need not resolve in a container
                os.environ["MASTER_ADDR"] = "127.0.0.1"
        return train_py.main(args)

    def checkpoint(self):
        # Called by submitit on rank 0 when USR2 arrives (time limit or preemption). train.py
        # writes checkpoint.pth at the end of every epoch and resumes from it on start, so the
        # requeued job redoes at most the epoch that was running.
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


# --- What runs on the submitting machine ----------------------------------------------------------
def tasks_per_node(args):
    return args.tasks_per_node or max(args.gpus_per_node, 1)


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
            raise SubmitError("no shared folder for the job: pass --job-dir on a file system every node "
                              "sees, or set GBG_JOB_ROOT (or SCRATCH)")
        job_dir = os.path.join(root, "gbg", "%j")
    job_dir = os.path.abspath(os.path.expanduser(os.path.expandvars(job_dir)))
    if args.cluster == "slurm" and any(job_dir == d or job_dir.startswith(d + "/") for d in NODE_LOCAL):
        raise SubmitError(f"--job-dir {job_dir} is on a node-local disk that the compute nodes can't "
                          f"see; pass --job-dir on a shared file system, or set GBG_JOB_ROOT")
    return job_dir


def check_request(args):
    """Everything that would otherwise fail on the node, after the wait in the queue."""
    world = args.nodes * tasks_per_node(args)
    if min(args.nodes, tasks_per_node(args)) < 1 or args.gpus_per_node < 0:
        raise SubmitError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
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
    if args.dataset in NEEDS_DATA_ROOT and not os.path.isdir(args.data_root):
        raise SubmitError(f"data root {args.data_root} does not exist on this machine; pass --data-root "
                          f"pointing at the {args.dataset} folder (on a file system the nodes see)")


def slurm_parameters(args):
    """sbatch options, in submitit.SlurmExecutor's names."""
    gpus, tasks = args.gpus_per_node, tasks_per_node(args)
    params = dict(job_name=f"gbg-{args.dataset}", nodes=args.nodes, ntasks_per_node=tasks,
                  gpus_per_node=gpus or None, cpus_per_task=args.cpus_per_task,
                  mem=submitit.slurm.slurm._convert_mem(args.mem_gb or max(40 * gpus, 16)),
                  time=max(1, math.ceil(args.timeout)), signal_delay_s=args.signal_delay_s,
                  partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                  # requeueable even where the cluster's default says no (JobRequeue=0): submitit's
                  # requeue on USR2 and SLURM's own after a preemption or node failure need it
                  additional_parameters=dict(requeue=True))
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(args):
    """The script SlurmExecutor would submit: same template, same command (it needs no srun)."""
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(args.job_dir)}"
    return submitit.slurm.slurm._make_sbatch_string(command=command, folder=args.job_dir, **slurm_parameters(args))


def train_flags(args):
    """The train.py flags that differ from train.py's defaults, as a command line."""
    defaults = vars(train.get_args_parser().parse_args([]))
    flags = []
    for k, v in vars(args).items():
        if k in defaults and v is not None and v != defaults[k]:
            value = " ".join(map(str, v)) if isinstance(v, list) else v
            flags.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {value}"))
    return " ".join(flags)


def failure_cause(error):
    """The last line of the job's traceback (submitit puts it between two dashed lines)."""
    parts = str(error).split("-" * 22)
    text = parts[1] if len(parts) > 2 else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


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
    if args.dry_run:
        try:
            check_request(args)
        except SubmitError as e:  # the script is still worth seeing
            print(f"submit.py: warning: {e}", file=sys.stderr)
        print(sbatch_script(args))
        print(f"submit.py: dry run, nothing submitted; each task would run train.py {train_flags(args)}",
              file=sys.stderr)
        return
    check_request(args)
    if args.cluster == "slurm" and submitit.SlurmExecutor.affinity() < 0:
        raise SubmitError("no srun here: submit from a SLURM login node, or use --cluster local or --dry-run")
    parent = Path(args.job_dir.split("%j")[0])
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubmitError(f"cannot create the job folder {parent} ({e.strerror}); pass a writable --job-dir")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's complaint; we name it once
            job = make_executor(args).submit(Trainer(args))
    except submitit.core.utils.FailedJobError as e:
        reason = " ".join(str(e).split())[:300]
        raise SubmitError(f"sbatch refused the job: {reason}; check --partition, --timeout, --account and "
                          f"--qos against the cluster's limits (sinfo, sacctmgr show qos)") from None
    folder = args.job_dir.replace("%j", str(job.job_id))
    print(f"job {job.job_id}: logs, checkpoints and results in {folder}", flush=True)
    if args.cluster == "slurm":
        print(f"follow it with: squeue -j {job.job_id}; tail -f {folder}/{job.job_id}_0_log.out; "
              f"cat {folder}/log.txt")
        return
    try:  # local and debug: wait, so the command ends when the job does
        job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        raise SubmitError(f"job {job.job_id} failed: {failure_cause(e)}; full log: {job.paths.stderr}") from None
    print(f"job {job.job_id} done: {folder}/results.json")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (SubmitError, data_lt.UserError) as e:
        sys.exit(f"submit.py: error: {e}")
