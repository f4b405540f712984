"""Stops a run whose loss, weights or EMA became NaN/Inf: one line naming the steps and what to change,
and never a checkpoint holding them. Always on (difflab-train adds it whatever ``callbacks=`` says).

Each check rides on a host read that happens anyway, so it costs no extra sync: the loss window when the
module hands it to the loggers (it leaves ``logged_window`` for this callback), the weights when a
checkpoint is about to be written (raising in ``on_save_checkpoint`` stops the write). Under DDP every
rank checks at the same step and all stop if any saw a NaN: a rank stopping alone would leave the
others waiting in the next collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from difflab.errors import DifflabError


class DivergenceGuard(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        window = getattr(pl_module, "logged_window", None)
        if window is not None:
            pl_module.logged_window = None
            finite, steps, last = window
            self.check(trainer, pl_module, finite, "the loss", last - steps + 1, last)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Two host syncs per checkpoint (per-tensor isfinite: a norm would overflow on large finite weights).
        tensors = [p.detach() for p in pl_module.parameters()]  # the UNet's and the loss weighting's
        tensors += pl_module.ema.all_shadows() if pl_module.ema is not None else []
        step = trainer.global_step
        finite = torch.stack([t.isfinite().all() for t in tensors])
        self.check(trainer, pl_module, finite, "the weights or EMA", step, step)
        window = pl_module.loss_window
        self.check(trainer, pl_module, window.finite(), "the loss", step - window.steps + 1, step)

    @staticmethod
    def check(
        trainer: L.Trainer,
        module: L.LightningModule,
        finite: torch.Tensor,
        what: str,
        first: int,
        last: int,
    ) -> None:
        """Raise one line unless ``finite`` (a bool tensor) is all true, on every rank; ``first``..``last``:
        the optimizer steps (counted from 1) it covers."""
        bad = (~finite.all()).float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad):  # the one host sync
            return
        where = f"steps {first}-{last}" if first < last else f"step {last}"
        ckpt = trainer.checkpoint_callback
        kept = list(Path(ckpt.dirpath).glob("*.ckpt")) if ckpt is not None and ckpt.dirpath else []
        keep = f"the checkpoints in {ckpt.dirpath} predate it" if kept else "no checkpoint was written"
        hints = [f"lower model.optimizer.lr (now {module.optimizer_factory.keywords.get('lr', '?')})"]
        hints.append("raise model.warmup_steps")
        if not trainer.gradient_clip_val:
            hints.append("set trainer.gradient_clip_val=1.0")
        if "16" in str(trainer.precision):
            hints.append("try trainer.precision=32-true")
        raise DifflabError(
            f"training diverged: {what} became NaN/Inf at {where} ({keep}); " + ", ".join(hints)
        )
