"""Save an exact checkpoint and stop cleanly on SIGTERM / SIGUSR1 (preemption, SLURM time limits) and
on Ctrl-C (SIGINT); a second Ctrl-C stops at once."""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from difflab.callbacks.checkpoint import RunCheckpoint

log = logging.getLogger(__name__)


class PreemptionCallback(L.Callback):
    """On a termination signal: finish the current optimizer step, write ``last.ckpt`` from inside the
    loop (so it carries the loader state and resumes exactly), then stop with exit status 0.

    Lightning alone only notes SIGTERM and exits at the end of the epoch (one process) or raises at the
    next step (DDP) without saving; its SLURM handler saves from inside the signal handler, possibly
    mid-step; on Ctrl-C it exits with status 1 and saves nothing. Here the signal only sets a flag; the
    save happens at an optimizer-step boundary (never between the micro-batches of one accumulated
    step: that file would count a batch whose gradient it does not hold).

    Ctrl-C is handled as SIGTERM; a second one raises KeyboardInterrupt, which Lightning turns into an
    immediate stop without a save.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        self.signals = tuple(getattr(signal, s) for s in signals)
        self.requested = False
        self._interrupted = False
        self.saved_step = -1
        self._step_at_batch_start = -1
        self._at_step_boundary = True  # the last batch completed an optimizer step (or none ran yet)
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in self.signals:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            signal.signal(sig, self._make_handler(previous))
        self._pid = os.getpid()
        self._previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._interrupt)

    def _make_handler(self, previous: object):
        def handler(signum: int, frame: FrameType | None) -> None:
            self.requested = True
            if callable(previous):  # keep Lightning's own handlers (SLURM requeue, DDP launcher)
                previous(signum, frame)

        return handler

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the trainer saves
            return
        if self._interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._interrupted = self.requested = True
        log.warning("interrupted: saving a checkpoint after this step, then stopping (Ctrl-C again: now)")

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step or not self._at_step_boundary:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint) and cb.save_last:
                cb.save_now(trainer)
                self.saved_step = trainer.global_step
                log.warning("termination signal: saved checkpoint at step %d, stopping", trainer.global_step)
                return

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self._at_step_boundary = trainer.global_step != self._step_at_batch_start
        if not self._at_step_boundary:
            return
        stop = self.requested or getattr(trainer, "received_sigterm", False)
        if trainer.world_size > 1:
            # Ctrl-C reaches every rank, not at the same step: all save and stop at the first step any
            # rank saw it (a save alone would wait for the others at its barrier).
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
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
