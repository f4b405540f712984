"""Logger factories that make wandb safe to use anywhere: one run id per run dir, offline fallback."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


def _wandb_usable(timeout_s: float = 2.0) -> str | None:
    """None if wandb can log online, else the reason it cannot (no login, no network)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            auth = netrc.netrc().authenticators("api.wandb.ai")
        except (FileNotFoundError, netrc.NetrcParseError):
            auth = None
        if not auth:
            return "not logged in (no WANDB_API_KEY, no `wandb login`)"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout_s).close()
    except OSError as e:
        return f"{host} unreachable ({e.__class__.__name__})"
    return None


def _sweep_group() -> str | None:
    """The multirun's sweep dir name, so every job of one sweep lands in one wandb group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except ValueError:  # HydraConfig not set (library use)
        pass
    return None


def wandb_logger(
    save_dir: str,
    project: str = "difflab",
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    name: str | None = None,
    offline: bool = False,
    log_model: bool = False,
    job_type: str | None = None,
) -> WandbLogger:
    """A WandbLogger whose run id is stored in the run dir: resuming the run dir continues the wandb run.

    With no login or no network it logs offline (one warning) instead of hanging or failing.
    """
    run_dir = Path(save_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # wandb accepts any [a-z0-9] id
        id_file.write_text(run_id + "\n")
    if not offline:
        reason = _wandb_usable()
        if reason is not None:
            log.warning("wandb: %s; logging offline to %s (upload later with `wandb sync`)", reason, run_dir)
            offline = True
    return WandbLogger(
        save_dir=str(run_dir),
        project=project,
        entity=entity,
        group=group or _sweep_group(),
        tags=list(tags),
        name=name,
        offline=offline,
        id=run_id,
        resume="allow",
        log_model=log_model,
        job_type=job_type,
    )


def finish_loggers(loggers: Sequence[object]) -> None:
    """Close wandb runs: flushes the files, and the next job of a multirun gets a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run must append."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that keeps the history of a resumed run dir: metrics.csv grows, never restarts."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
