"""ModelCheckpoint that also saves at the final step, inside ``fit`` (so loader state is included),
and that resumes its own bookkeeping exactly (``last.ckpt``, the step saved last, top-k deletions)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from difflab.files import atomic_write


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint saves every N steps only; a run whose max_steps is not a multiple of N
    would end without a checkpoint of its final weights. This saves once more at the last step, from
    within the training loop, so the file carries the data-loader state like every other one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._removing: str | None = None  # the top-k file being replaced while a checkpoint is written

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A kill between a step checkpoint and last.ckpt (or during the final last.ckpt) leaves last.ckpt
        # behind the state the run resumed from, and a run with nothing left to train never rewrites it.
        resumed = trainer.ckpt_path
        if not (self.save_last and resumed and trainer.is_global_zero and self.dirpath):
            return
        last = Path(self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST))
        if "://" not in str(resumed) and Path(resumed).resolve() != last.resolve():
            with open(resumed, "rb") as src:
                atomic_write(last, lambda f: shutil.copyfileobj(src, f))
            self.last_model_path = str(last)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The state at this step is on disk already (the resumed file). Lightning does not restore this
        # marker: under gradient accumulation the first micro-batch would rewrite that step's files with
        # a batch counted as done whose gradient no file holds.
        self._last_global_step_saved = trainer.global_step
        stale, self._removing = self._removing, None
        if stale and stale not in self.best_k_models and Path(stale).is_file():
            self._remove_checkpoint(trainer, stale)  # its deletion was cut short by a kill

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

    def _update_best_and_save(self, current: Any, trainer: L.Trainer, monitor_candidates: dict) -> None:
        # Lightning drops the file it replaces from best_k_models, writes the new checkpoint (whose state
        # no longer names the old file), then deletes it: recorded here, a kill in between cannot leave
        # it on disk for good.
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        full = len(self.best_k_models) == k and k > 0
        self._removing = self.kth_best_model_path if full else None
        try:
            super()._update_best_and_save(current, trainer, monitor_candidates)
        finally:
            self._removing = None

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Lightning never deletes the file the run resumed from. Here that is the run dir's own newest
        # step checkpoint (ckpt_path=last), one of the top-k like the others: kept, it outlives save_top_k.
        if previous != current and self.dirpath and "://" not in str(previous):
            return Path(self.dirpath).absolute() in Path(previous).absolute().parents
        return super()._should_remove_checkpoint(trainer, previous, current)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "removing": self._removing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self._removing = state_dict.get("removing")
