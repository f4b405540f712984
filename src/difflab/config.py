"""Where difflab's configs live and how run dirs are named (the functions behind its resolvers)."""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from pathlib import Path

# The configs ship inside the package (difflab/conf): in a checkout, a link to the repository's conf/
# (whose experiment/ links to experiments/); in a wheel, copies of both. DIFFLAB_CONF_DIR replaces them
# all; to add configs of one's own, Hydra's search path: hydra.searchpath=[file://my_conf].
CONF_DIR = os.environ.get("DIFFLAB_CONF_DIR", str(Path(__file__).resolve().parent / "conf"))


def new_run_dir(log_dir: str, ckpt_path: str | None = None) -> str:
    """A run directory: the checkpoint's own run when resuming from ``<run>/checkpoints/x.ckpt``,
    otherwise ``<log_dir>/runs/<time>_<random>`` (two runs started in the same second never collide)."""
    if ckpt_path and ckpt_path != "last":
        p = Path(ckpt_path).expanduser().resolve()
        if p.parent.name == "checkpoints":
            return str(p.parent.parent)
    if (job := launcher_job_name()) is not None:
        # Every rank of the job resolves this name, and a requeued job keeps it: ckpt_path=last resumes.
        return str(Path(log_dir) / "runs" / job)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    while True:
        run = Path(log_dir) / "runs" / f"{stamp}_{secrets.token_hex(3)}"
        if not run.exists():
            return str(run)


# The sweep dir's name, set by difflab-train (cli.Command.main) for the processes it starts: the
# submitit launcher's jobs (local, or sbatch, which passes the environment on to every task and
# requeue) resolve the sweep config again and must find the same dir.
UNIQUE_VARIABLE = "DIFFLAB_UNIQUE"


def launcher_job_name() -> str | None:
    """A name every process of one launched job shares, and a requeue of it keeps: ``slurm_<job>``
    (``slurm_<array job>_<task>`` for an array task), ``torchrun_<rdzv id>``; None outside a launcher."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm_{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm_{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id not in (None, "", "none"):
        return f"torchrun_{run_id}"
    if run_id == "none" and env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        # torchrun on one node without --rdzv-id: its agent, every rank's parent, names the job (and
        # stays the parent when it restarts the ranks). Several nodes need --rdzv-id (launch_problems).
        return f"torchrun_{socket.gethostname()}_{os.getppid()}"
    return None


def unique_suffix() -> str:
    """A sweep dir's name: the one the launching difflab-train chose, else this process's own."""
    return os.environ.get(UNIQUE_VARIABLE) or own_suffix()


@functools.cache
def own_suffix() -> str:
    """The launched job's name, else `<time>_<random>`; fixed for the process (Hydra resolves a sweep
    dir more than once)."""
    return launcher_job_name() or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


@functools.cache
def run_dir_once(log_dir: str, ckpt_path: str | None) -> str:
    return new_run_dir(log_dir, ckpt_path)  # resolved more than once per process: same answer


def make_dir(path: str) -> str:
    """Create ``path`` (for files opened before any job runs, such as the Optuna SQLite study)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path
