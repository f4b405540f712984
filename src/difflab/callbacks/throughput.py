"""Images/s, global batch and images seen, measured on the host clock with no device sync."""

from __future__ import annotations

import time
from typing import Annotated

import lightning as L

from difflab.rules import AtLeast


class ThroughputCallback(L.Callback):
    """Logs ``perf/images_per_sec`` (mean over each logging window), ``perf/global_batch``, ``train/kimg``.

    Lightning's ThroughputMonitor wants a FLOP count and synchronises the device; a wall-clock rate
    over a window of N steps needs neither (the queue of launched kernels is bounded).
    """

    def __init__(self, every_n_steps: Annotated[int, AtLeast(1)] | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0
        self._rate: float | None = None
        self._seen_step = -1

    @staticmethod
    def global_batch(trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        per_device = getattr(dm, "batch_size", 0)
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step, gb = trainer.global_step, self.global_batch(trainer)
        if step == self._seen_step:
            return  # a micro-batch that did not step (gradient accumulation)
        self._seen_step = step
        every = self.every_n_steps or trainer.log_every_n_steps
        if self._t0 is not None and step - self._step0 >= every:
            now = time.perf_counter()
            self._rate = gb * (step - self._step0) / (now - self._t0)
            self._t0, self._step0 = now, step
        log_every = trainer.log_every_n_steps
        if not log_every or (step % log_every and not trainer.should_stop):
            return  # Lightning hands metrics to loggers only every log_every_n_steps: skip the Python cost
        values = {"perf/global_batch": float(gb), "train/kimg": step * gb / 1000}
        if self._rate is not None:
            values["perf/images_per_sec"] = self._rate
        pl_module.log_dict(values, rank_zero_only=True)
