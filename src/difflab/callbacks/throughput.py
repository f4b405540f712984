"""Images/s, global batch and images seen, measured on the host clock with no device sync."""

from __future__ import annotations

import time

import lightning as L


class ThroughputCallback(L.Callback):
    """Logs ``perf/images_per_sec`` (mean over each logging window), ``perf/global_batch``, ``train/kimg``.

    Lightning's ThroughputMonitor wants a FLOP count and synchronises the device; a wall-clock rate
    over a window of N steps needs neither (the queue of launched kernels is bounded).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0
        self._rate: float | None = None

    @staticmethod
    def global_batch(trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        per_device = getattr(dm, "batch_size", 0)
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step, gb = trainer.global_step, self.global_batch(trainer)
        if self._t0 is not None and step - self._step0 >= every:
            now = time.perf_counter()
            self._rate = gb * (step - self._step0) / (now - self._t0)
            self._t0, self._step0 = now, step
        if not trainer._logger_connector.should_update_logs:
            return  # Lightning only hands metrics to loggers on log steps; skip the Python cost otherwise
        values = {"perf/global_batch": float(gb), "train/kimg": step * gb / 1000}
        if self._rate is not None:
            values["perf/images_per_sec"] = self._rate
        pl_module.log_dict(values, rank_zero_only=True)
