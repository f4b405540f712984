"""One progress bar for the whole run: optimizer steps toward the end, loss, img/s and time left."""

from __future__ import annotations

from typing import Annotated, Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from difflab.cadence import due
from difflab.rules import AtLeast


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting optimizer steps toward ``trainer.max_steps`` instead of restarting
    every epoch (a step-budgeted run has no meaningful epoch count), so tqdm's rate and time left are
    the run's. A resumed run starts at its step. Redrawn every ``refresh_rate`` steps: reading the loss
    for display syncs the device."""

    def __init__(self, refresh_rate: Annotated[int, AtLeast(1)] = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._total = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        bar = self.train_progress_bar
        bar.reset(total=self._total)
        bar.initial = bar.n = trainer.global_step  # tqdm's rate counts from here: a resume is not instant
        bar.set_description("steps")
        bar.unit = "step"

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # no per-epoch reset

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if step == bar.n or (not due(step, self.refresh_rate) and step < self._total):
            return
        bar.update(step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        rate = trainer.callback_metrics.get("perf/images_per_sec")
        if rate is not None:
            metrics["img/s"] = f"{float(rate):.0f}"
        return metrics
