"""Checkpoint files: atomic writes, safe loading, finding `last`, and resume compatibility checks (the
difflab part of a checkpoint's contents is run_record.RunRecord's; loading a model for inference is
inference.py's)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from difflab.errors import DifflabError
from difflab.files import DiskFullError, atomic_write
from difflab.run_record import RunRecord

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``path.tmp`` then renames it over ``path``: a crash mid-save never corrupts a checkpoint.

    Lightning's TorchCheckpointIO streams straight into the final file, so a kill during the write
    leaves a truncated ``last.ckpt``, and a full disk surfaces as a bare ``OSError`` that leaves the
    partial file behind; ``os.replace`` is atomic on POSIX file systems. Loading is weights-only.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote file systems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except DiskFullError:
            intact = path if path.exists() else newest_checkpoint_file(path.parent)
            kept = f"the previous checkpoint {intact} is intact" if intact else "no earlier checkpoint exists"
            raise DifflabError(
                f"no space left on device writing {path}; {kept}; free space and rerun"
            ) from None

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint_file(path)  # also Lightning's own files (ddp_spawn's .temp.ckpt)


# A PyTorch checkpoint is a zip archive; anything else cannot be one (checked before unpickling).
_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a difflab checkpoint on CPU with ``weights_only=True`` (no arbitrary code from the file).
    Every way a file can fail to be one ends in one DifflabError naming the file and the reason."""
    ckpt = read_checkpoint_file(path)
    RunRecord.from_checkpoint(ckpt, path)  # refuses a file without difflab's record
    if "state_dict" not in ckpt:
        raise DifflabError(f"{path} is not a difflab training checkpoint (no weights)")
    return ckpt


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line DifflabErrors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        what = "an empty file" if not head else "not a PyTorch checkpoint file"
        raise DifflabError(f"{path} is not a difflab checkpoint: it is {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running code from the file: never.
        raise DifflabError(
            f"{path} is not a difflab checkpoint: it holds Python objects a checkpoint never contains "
            "(refusing to unpickle them)"
        ) from None
    except Exception:  # truncated or damaged archive: zip, stream and EOF errors with opaque messages
        raise DifflabError(f"{path} is truncated or corrupt: it cannot be read as a checkpoint") from None
    return ckpt


def _newest_first(files: list[Path]) -> list[Path]:
    # last.ckpt wins a tie: it is written right after the step checkpoint of the same step.
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)


def checkpoint_files(run_dir: str | os.PathLike) -> list[Path]:
    """A run dir's checkpoints (``checkpoints/*.ckpt`` or Lightning's SLURM ``hpc_ckpt_*``), newest first."""
    run_dir = Path(run_dir)
    return _newest_first([*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")])


def newest_checkpoint_file(ckpt_dir: Path) -> Path | None:
    files = _newest_first(list(ckpt_dir.glob("*.ckpt")))
    return files[0] if files else None


def find_last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest *readable* checkpoint of a run dir (see ``newest_readable``)."""
    found = newest_readable(run_dir)
    return found[0] if found else None


def newest_readable(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """(path, contents) of the newest checkpoint of a run dir that loads. A newer one that is corrupt
    or truncated (a crash outside difflab's atomic writer, a bad copy) is skipped with one warning
    naming both files; if every one is unreadable, that is an error, never a silent fresh start."""
    bad: list[str] = []
    for path in checkpoint_files(run_dir):
        try:
            ckpt = load_checkpoint(path)
        except DifflabError as e:
            bad.append(str(e))
            continue
        if bad:
            log.warning("%s; resuming from %s instead", "; ".join(bad), path)
        return path, ckpt
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DifflabError(
            f"no readable checkpoint in {Path(run_dir)}: {bad[0]}{more}; "
            "move them away to start afresh, or give ckpt_path=<file>"
        )
    return None


def resume_checkpoint(ckpt_path: str | None, run_dir: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """What to resume from, loaded: ``null``: nothing; ``last``: the run dir's newest readable checkpoint
    (nothing if it has none); else that file, which must be a readable difflab checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = newest_readable(run_dir)
        return (str(found[0]), found[1]) if found else None
    if Path(ckpt_path).is_dir():
        what = (
            "an exported pipeline (weights only: no optimizer state or step to resume)"
            if (Path(ckpt_path) / "model_index.json").is_file()
            else "a directory"
        )
        raise DifflabError(
            f"ckpt_path={ckpt_path} is {what}; give a training checkpoint (<run>/checkpoints/*.ckpt) "
            "or ckpt_path=last"
        )
    if not Path(ckpt_path).is_file():
        raise DifflabError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or ckpt_path=last")
    return str(ckpt_path), load_checkpoint(ckpt_path)


def start_next_epoch_after_epoch_end(trainer: Any) -> None:
    """Call at ``on_train_start``: after a resume from a checkpoint written on an epoch's last batch,
    start the next epoch as an uninterrupted run does.

    Lightning (2.6) closes the restored epoch in ``FitLoop.reset`` but leaves the loop marked as
    restarted mid-epoch, so the next epoch begins without counting itself ready and started: every
    checkpoint of that run is one epoch behind, and a second resume from one of them at an epoch end
    replays an epoch of data (and noise). Clearing the restart stage lets Lightning's own epoch start
    run (counters and ``on_train_epoch_start``); the training-epoch loop keeps its own restart state.
    """
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current
    if loop.restarted_mid_epoch and epoch.processed == epoch.started:  # reset() closed the epoch
        loop.reset_restart_stage()


def repair_epoch_progress(checkpoint: dict[str, Any]) -> None:
    """Call at ``on_load_checkpoint``: a checkpoint written by a run resumed from an epoch end before
    ``start_next_epoch_after_epoch_end`` counts its epoch as not started. Saved at a batch's end it is
    inside a started epoch (ready = started = processed + 1); set so, Lightning resumes that epoch."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    mid_batch = batches["total"]["processed"] > batches["total"]["completed"]
    for counts in (epochs["total"], epochs["current"]):
        if mid_batch and counts["ready"] == counts["started"] == counts["processed"]:
            counts["ready"] = counts["started"] = counts["processed"] + 1


def config_differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    keys: set[str] | None = None,
    saved_name: str = "checkpoint",
) -> list[str]:
    """``key (<saved_name> a, config b)`` for each key whose values differ (private keys skipped)."""
    keys = keys or (set(saved) | set(current))
    out = []
    for k in sorted(keys):
        if k.startswith("_"):
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{k} ({saved_name} {a!r}, config {b!r})")
    return out


def check_resume_compatible(
    ckpt: dict[str, Any], unet_config: dict[str, Any], scheduler_config: dict[str, Any], path: str = ""
) -> None:
    """Refuse to resume when the network or the noise schedule differs from the checkpoint's."""
    from difflab.diffusion.noise import objective_of  # here: diffusers is slow to import

    record = RunRecord.from_checkpoint(ckpt, path)
    theirs, mine = record.objective, objective_of(scheduler_config)
    if theirs != mine:
        raise DifflabError(
            f"cannot resume from {path}: it was trained with model={theirs}, this run is model={mine}"
        )
    diffs = [f"model.unet.{d}" for d in config_differences(record.unet_config, unet_config)]
    sched_keys = {
        "shift",
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "prediction_type",
        "rescale_betas_zero_snr",
    }
    diffs += [
        f"model.noise_scheduler.{d}"
        for d in config_differences(record.scheduler_config, scheduler_config, sched_keys)
    ]
    if diffs:
        raise DifflabError(
            f"cannot resume from {path}: the config differs from the checkpoint in "
            + "; ".join(diffs)
            + ". Use the checkpoint's settings (see its run dir's config.yaml) or start a new run"
        )
