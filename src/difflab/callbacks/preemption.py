"""Save an exact checkpoint and stop cleanly on a termination signal (preemption, SLURM and submitit
time limits) and on Ctrl-C (SIGINT); a second Ctrl-C stops at once. The one place that requeues."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Literal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from difflab.cadence import due
from difflab.callbacks.checkpoint import RunCheckpoint
from difflab.rules import AtLeast

log = logging.getLogger(__name__)
# Any signal a handler can catch (not SIGKILL, SIGSTOP).
SignalName = Literal[tuple(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP))]  # type: ignore[valid-type]


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``<array job>_<task>`` for an array task)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (it restarts with the same job id, so the same run dir)."""
    job = slurm_job_id()
    if job is None:
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return
    if done.returncode:
        log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job)


@contextmanager
def launcher_outlives_first_ctrl_c(trainer: L.Trainer) -> Iterator[None]:
    """Around ``fit`` in a process that only starts and waits for its ranks (``ddp_spawn``): Ctrl-C
    reaches the ranks too (the terminal's process group), whose preemption callbacks save and stop;
    the launcher, which runs no callbacks, keeps waiting for them instead of ending them unsaved. A
    second Ctrl-C stops it at once."""
    spawns = getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver")
    if not spawns or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True
        log.warning("interrupted: the ranks save a checkpoint after this step, then stop (Ctrl-C again: now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class PreemptionCallback(L.Callback):
    """On a termination signal: finish the current optimizer step, write ``last.ckpt`` from inside the
    loop (so it carries the loader state and resumes exactly), then stop with exit status 0. On a
    ``requeue_signals`` signal inside a SLURM job, global rank 0 then requeues the job.

    Lightning alone only notes SIGTERM and exits at the end of the epoch (one process) or raises at the
    next step (DDP) without saving; its SIGTERM handler runs a collective inside the handler (the ranks
    abort) and its SLURM handler saves ``hpc_ckpt`` from inside the handler, possibly mid-step, and
    requeues on its own. Here the handlers only set a flag and replace (never chain to) Lightning's and
    submitit's; the save happens at an optimizer-step boundary (never between the micro-batches of one
    accumulated step: that file would count a batch whose gradient it does not hold).

    Under DDP the flag is rank-local (a signal may reach one rank, or the ranks at different steps), so
    the ranks agree every ``sync_every_n_steps`` steps: all save and stop at the same step.

    Ctrl-C is handled as SIGTERM; a second one raises KeyboardInterrupt, which Lightning turns into an
    immediate stop without a save.
    """

    def __init__(
        self,
        signals: tuple[SignalName, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue_signals: tuple[SignalName, ...] = ("SIGUSR1", "SIGUSR2"),
        sync_every_n_steps: Annotated[int, AtLeast(1)] = 10,
    ) -> None:
        self.signals = tuple(signal.Signals[s] for s in signals)
        self.requeue_signals = tuple(signal.Signals[s] for s in requeue_signals)
        self.sync_every_n_steps = int(sync_every_n_steps)
        self.requested = False
        self.requeue = False  # a requeue signal arrived
        self._interrupted = False
        self.saved_step = -1
        self._step_at_batch_start = -1
        self._at_step_boundary = True  # the last batch completed an optimizer step (or none ran yet)
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Where Lightning's signal connector reads it (a one-device strategy has none of its own).
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            # Lightning registers its SLURM handler after this hook: off, the requeue is ours alone.
            environment.auto_requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pid = os.getpid()
        for sig in (*self.signals, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._interrupt if sig == signal.SIGINT else self._terminate)

    def _terminate(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the trainer saves
            return
        self.requested = True
        self.requeue = self.requeue or signum in self.requeue_signals
        log.warning("%s: saving a checkpoint at a step boundary, then stopping", signal.Signals(signum).name)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
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
        stop, requeue = self.requested or getattr(trainer, "received_sigterm", False), self.requeue
        if trainer.world_size > 1:
            if not due(trainer.global_step, self.sync_every_n_steps):
                return
            # Any rank's flags, agreed by all: one all_reduce of 2 numbers and one host read every
            # sync_every_n_steps steps (SLURM and submitit warn 90-120 s ahead; a step takes ~0.1-1 s).
            # Lightning itself already broadcasts rank 0's SIGTERM flag and reads it on every step.
            flags = torch.tensor([stop, requeue], dtype=torch.float32, device=trainer.strategy.root_device)
            stop, requeue = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if stop:
            self._save(trainer)
            trainer.should_stop = True
            if requeue and trainer.is_global_zero:
                requeue_slurm_job()

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
