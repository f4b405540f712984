"""Save an exact checkpoint and stop cleanly on SIGTERM / SIGUSR1 (preemption, SLURM time limits)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from difflab.callbacks.checkpoint import RunCheckpoint

log = logging.getLogger(__name__)


class PreemptionCallback(L.Callback):
    """On a termination signal: finish the current step, write ``last.ckpt`` from inside the loop (so
    it carries the loader state and resumes exactly), then stop with exit status 0.

    Lightning alone only notes SIGTERM and exits at the end of the epoch (one process) or raises at the
    next step (DDP) without saving; its SLURM handler saves from inside the signal handler, possibly
    mid-step. Here the signal only sets a flag; the save happens at a step boundary.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        self.signals = tuple(getattr(signal, s) for s in signals)
        self.requested = False
        self.saved_step = -1
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in self.signals:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            signal.signal(sig, self._make_handler(previous))

    def _make_handler(self, previous: object):
        def handler(signum: int, frame: FrameType | None) -> None:
            self.requested = True
            if callable(previous):  # keep Lightning's own handlers (SLURM requeue, DDP launcher)
                previous(signum, frame)

        return handler

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint) and cb.save_last:
                cb.save_now(trainer)
                self.saved_step = trainer.global_step
                log.warning("termination signal: saved checkpoint at step %d, stopping", trainer.global_step)
                return

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self.requested or getattr(trainer, "received_sigterm", False):
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # DDP raises at the start of the next step, between steps: the state is consistent, save it.
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
