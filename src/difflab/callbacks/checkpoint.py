"""ModelCheckpoint that also saves at the final step, inside ``fit`` (so loader state is included)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint saves every N steps only; a run whose max_steps is not a multiple of N
    would end without a checkpoint of its final weights. This saves once more at the last step, from
    within the training loop, so the file carries the data-loader state like every other one."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        max_epochs = trainer.max_epochs or 0
        last_epoch = trainer.max_steps in (-1, None) and 0 < max_epochs <= trainer.current_epoch + 1
        if last_epoch and self._last_global_step_saved != trainer.global_step:
            self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> None:
        monitor_candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)
