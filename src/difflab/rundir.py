"""A run dir at start-up, before Hydra writes into it: it can be written, one run at a time holds it,
and a resumed run keeps the settings its checkpoint was trained with.

All of it runs in the console script's preflight (cli.py), so a refused start writes nothing: not
the new run's dir, not an existing run's ``.hydra/`` or log.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from difflab.errors import DifflabError
from difflab.rules import _shown as shown

log = logging.getLogger("difflab.train")

LOCK_NAME = ".lock"  # holds the pid of the run that has the dir (a failed start removes it again)

# The lock's open file, kept for the life of the process: the kernel drops an flock when its holder
# dies however it dies (kill -9 too), so a crashed run never leaves the dir locked.
_held: dict[Path, int] = {}

# Environment variables that name a process's rank when a launcher (torchrun, SLURM, Lightning's
# subprocess launcher for strategy=ddp) starts one difflab-train per rank on the same run dir.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


# ------------------------------------------------------------------------------------ writable dirs
def make_writable_dir(path: Path | str, key: str, under: tuple[str, str] | None = None) -> list[Path]:
    """Create ``path`` (and its missing parents) and check a file can be written there; the dirs it
    created, deepest first. On failure nothing is left and one DifflabError names ``key=path``, or
    ``under`` (the user's key and value that ``path`` was made from: paths.log_dir for a run dir)."""
    if not str(path).strip():  # Path("") is the launch dir: a run would write into it
        raise DifflabError(f"{key} is empty; give a directory ({key}=<dir>)")
    path = Path(path).expanduser()
    what, fix = (f"{key}={path}", key) if under is None else (f"{under[0]}={under[1]}: {path}", under[0])
    missing: list[Path] = []
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise DifflabError(
            f"{what} cannot be created: {existing} is a file, not a directory; choose another {fix}"
        )
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if d.is_dir():  # another process (a rank of the same job) made it meanwhile: not ours
                    continue
                raise
            created.insert(0, d)
        # A file that vanishes when closed: proves a write works (a read-only or full file system,
        # no permission) and leaves nothing behind.
        with tempfile.TemporaryFile(dir=path) as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        remove_dirs(created)
        reason = e.strerror or str(e)
        advice = "free space there or choose another" if e.errno == errno.ENOSPC else "choose a writable"
        raise DifflabError(f"{what} cannot be written ({reason}); {advice} {fix}") from None
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove the dirs ``make_writable_dir`` created (deepest first) if they are still empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            return


# -------------------------------------------------------------------------------------------- lock
def is_launched_rank() -> bool:
    """A process a launcher started for a rank other than the first: its run dir is rank 0's."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in _RANK_VARIABLES)


# Lightning's subprocess launcher (strategy=ddp) starts each further local rank with this process's
# sys.argv (-m and every sweep value included) and the parent's hydra.run.dir appended: each rank would
# run the whole sweep again, in dirs of its own. The parent's job passes its dir and overrides on here
# instead, and the rank runs that one job in that dir.
JOB_VARIABLE = "DIFFLAB_RANK_JOB"


def pass_job_to_ranks(output_dir: Path | str, overrides: list[str]) -> None:
    """Tell the local ranks this process is about to start which job they join (see JOB_VARIABLE)."""
    os.environ[JOB_VARIABLE] = json.dumps({"dir": str(output_dir), "overrides": list(overrides)})


def launched_rank_args(args: list[str]) -> list[str]:
    """The command line a local rank started by Lightning's subprocess launcher runs: its parent
    job's overrides in the parent job's dir (Lightning's own hydra.job.name and hydra.output_subdir
    kept); any other process's ``args`` unchanged."""
    job = os.environ.get(JOB_VARIABLE)
    if job is None or os.environ.get("LOCAL_RANK", "0") == "0":
        return args
    parent = json.loads(job)
    lightning = [a for a in args if a.startswith(("hydra.job.name=", "hydra.output_subdir="))]
    return [*parent["overrides"], f"hydra.run.dir={parent['dir']}", *lightning]


def lock_run_dir(run_dir: Path, key: str = "hydra.run.dir") -> bool:
    """Hold ``run_dir``'s lock for the rest of this process, or refuse in one line naming the holder's
    pid. True if the lock file was created here (a refused start removes it again)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _held:
        return False
    path = run_dir / LOCK_NAME
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DifflabError(
                f"{key}={run_dir} is in use by another running difflab-train (pid {holder}); wait "
                f"for it to end, or start this run elsewhere with {key}=<new dir>"
            ) from None
        # A failed start unlinks its lock file: if this one was unlinked between open and flock,
        # another start may lock a new file at the same path, so take that one instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[run_dir.resolve()] = fd
    return created


def release_locks() -> None:
    """Give up every run dir lock this process holds (a command called in-process has returned)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def unlock_run_dir(run_dir: Path, remove: bool) -> None:
    """Give up the lock taken by ``lock_run_dir`` (a refused start); ``remove``: delete its file."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is None:
        return
    if remove:
        (Path(run_dir) / LOCK_NAME).unlink(missing_ok=True)
    os.close(fd)


# ----------------------------------------------------------------------- settings of a resumed run
# What a resumed run may change: how long it goes on and what it logs, keeps and measures, never
# what a step computes. Every other setting (the model and its optimizer, the data and its batches,
# the seed, accumulation, devices, precision, clipping) is refused: the checkpoint's weights,
# optimizer state and data position were made by the old values, so the run would no longer be the
# one it claims to be (and Lightning would silently restore the old learning rate). A new key is
# refused until it is listed here, so an unlisted setting never changes a run unnoticed.
MAY_CHANGE_ON_RESUME = (
    # The length of the run. The LR schedule spans max_steps (warm-up, then cosine/linear decay to
    # 0 at the last step), so extending a run stretches the rest of the schedule to the new end:
    # allowed, as README shows, because extending a run is what a resume with a new max_steps is for;
    # the run's log names the change.
    "trainer.max_steps",
    "trainer.max_epochs",
    # Logging, checkpoints, grids, FID and progress: what the run records, not what it trains.
    "logger",
    "callbacks",
    "metrics",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.enable_progress_bar",
    "trainer.enable_checkpointing",
    "trainer.profiler",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "optimized_metric",
    "task_name",
    # Where and how the same computation runs (moving a run to another machine or launcher).
    "trainer.default_root_dir",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.plugins",
    "trainer.benchmark",
    "trainer.deterministic",
    "data.num_workers",
    "data.persistent_workers",
    "data.pin_memory",
)


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _shown(value: Any) -> str:
    return "(unset)" if value is _UNSET else shown(value)


_UNSET = object()


def changed_settings(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): ``key old -> new`` for each setting whose value differs between the run's
    recorded config and the new one (``MAY_CHANGE_ON_RESUME`` says which may)."""
    from difflab.compose import RENAMED

    recorded_now = {RENAMED.get(k, k): v for k, v in _leaves(recorded)}  # a run recorded before a rename
    old, now = _with_paths_named(recorded_now), _with_paths_named(dict(_leaves(new)))
    refused, allowed = [], []
    for key in sorted(set(old) | set(now)):
        if key.startswith("paths.") or key == "ckpt_path":
            # Where the run lives and how it was found, not how it trains (paths inside other
            # values compare as ${paths.x}): a moved run or another launch dir is the same run.
            continue
        a, b = old.get(key, _UNSET), now.get(key, _UNSET)
        if a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            continue
        # A key the run's config never had was added to difflab after the run started: refusing it
        # would strand every run across an upgrade, so it is taken at its value and the log says so.
        # (A key the run had and the new config lacks, e.g. `~model.ema`, is a real change: refused.)
        new_setting = a is _UNSET and not any(key.startswith(k + ".") for k in old)
        (allowed if _may_change(key) or new_setting else refused).append(f"{key} {_shown(a)} -> {_shown(b)}")
    return refused, allowed


def _with_paths_named(flat: dict[str, Any]) -> dict[str, Any]:
    """Paths under ``paths.*`` written as ``${paths.<name>}``: a run resumed from another launch dir,
    or moved, keeps the same settings (its checkpoint dir is still its ``${paths.output_dir}``)."""
    roots = sorted(
        ((k, v) for k, v in flat.items() if k.startswith("paths.") and isinstance(v, str) and v),
        key=lambda kv: -len(kv[1]),
    )
    out = {}
    for key, value in flat.items():
        if isinstance(value, str) and not key.startswith("paths."):
            for name, root in roots:
                if value == root or value.startswith(root.rstrip("/") + "/"):
                    value = "${" + name + "}" + value[len(root.rstrip("/")) :]
                    break
        out[key] = value
    return out


def check_resume_settings(recorded: Mapping[str, Any] | None, new: Mapping[str, Any], ckpt: str) -> list[str]:
    """Refuse a resume whose config changes a setting that must stay (one line naming them and how to
    start a new run); the allowed changes, ``key old -> new``, for the run's log."""
    if not recorded:
        return []  # a checkpoint from before configs were recorded: nothing to compare
    refused, allowed = changed_settings(recorded, new)
    if refused:
        shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise DifflabError(
            f"cannot resume from {ckpt} with changed settings: {shown}; a resumed run keeps its "
            "settings (see its config.yaml): drop these overrides, or start a new run with "
            "hydra.run.dir=<new dir> (ckpt_path=null to start from scratch)"
        )
    return allowed


def log_changed_settings(allowed: list[str]) -> None:
    if allowed:
        log.info("resuming with changed settings: %s", "; ".join(allowed))


def run_config(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """``cfg`` as the run records it (``RunRecord.config``): resolved, without Hydra's node;
    ``run_dir`` stands in for ``paths.output_dir`` before Hydra's runtime config exists."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if run_dir is not None and "paths" in cfg:
            cfg.paths.output_dir = str(run_dir)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def start_train_run(cfg: DictConfig) -> None:
    """difflab-train's preflight for one run (``cfg`` as composed, Hydra's node included): the run dir
    can be written and is this run's alone, and a resume keeps its checkpoint's objective and
    settings. A refusal leaves nothing behind: no new dir, lock file or checkpoint change."""
    from difflab.checkpoints import resume_checkpoint
    from difflab.run_record import RunRecord

    given = [
        str(o)
        for part in ("task", "hydra")  # hydra.run.dir=... is one of Hydra's own overrides
        for o in OmegaConf.select(cfg, f"hydra.overrides.{part}", default=None) or []
    ]
    where = str(cfg.hydra.run.dir)
    # The default run dir is made from paths.log_dir: name that if it is the user's.
    log_dir = next((o.partition("=")[2] for o in given if o.startswith("paths.log_dir=")), None)
    by_log_dir = log_dir is not None and not any(o.startswith("hydra.run.dir=") for o in given)
    created = make_writable_dir(where, "hydra.run.dir", ("paths.log_dir", log_dir) if by_log_dir else None)
    run_dir = Path(where)
    made_lock = False
    try:
        if not is_launched_rank():
            made_lock = lock_run_dir(run_dir)
        resume = resume_checkpoint(cfg.get("ckpt_path"), run_dir)
        if resume is None:
            return
        path, ckpt = resume
        record = RunRecord.from_checkpoint(ckpt, path)
        theirs = record.objective
        mine = OmegaConf.select(cfg, "hydra.runtime.choices.model")
        if mine in ("ddpm", "flow") and theirs != mine:
            raise DifflabError(
                f"cannot resume from {path}: it was trained with model={theirs}, this run is "
                f"model={mine}; give model={theirs}, or start a new run with hydra.run.dir=<new dir>"
            )
        try:
            new = run_config(cfg, run_dir)
        except OmegaConfBaseException:  # a value only Hydra's runtime resolves: train() compares
            return
        check_resume_settings(record.config, new, path)
    except BaseException:
        unlock_run_dir(run_dir, remove=made_lock)
        remove_dirs(created)
        raise
