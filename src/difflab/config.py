"""Where difflab's configs live and how run dirs are named (the functions behind its resolvers)."""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path

# conf/ sits at the repository root (editable install); DIFFLAB_CONF_DIR points elsewhere if needed.
CONF_DIR = os.environ.get("DIFFLAB_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def new_run_dir(log_dir: str, ckpt_path: str | None = None) -> str:
    """A run directory: the checkpoint's own run when resuming from ``<run>/checkpoints/x.ckpt``,
    otherwise ``<log_dir>/runs/<time>_<random>`` (two runs started in the same second never collide)."""
    if ckpt_path and ckpt_path != "last":
        p = Path(ckpt_path).expanduser().resolve()
        if p.parent.name == "checkpoints":
            return str(p.parent.parent)
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_ARRAY_TASK_ID"):
        # A requeued SLURM job keeps its job id: same run dir, so ckpt_path=last resumes it.
        return str(Path(log_dir) / "runs" / f"slurm_{os.environ['SLURM_JOB_ID']}")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    while True:
        run = Path(log_dir) / "runs" / f"{stamp}_{secrets.token_hex(3)}"
        if not run.exists():
            return str(run)


@functools.cache
def unique_suffix() -> str:
    """`<time>_<random>`, fixed for the process: Hydra resolves a sweep dir more than once."""
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


@functools.cache
def run_dir_once(log_dir: str, ckpt_path: str | None) -> str:
    return new_run_dir(log_dir, ckpt_path)  # resolved more than once per process: same answer


def make_dir(path: str) -> str:
    """Create ``path`` (for files opened before any job runs, such as the Optuna SQLite study)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path
