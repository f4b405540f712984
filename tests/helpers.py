"""Test-only callbacks, importable by spawned DDP workers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DumpRankState(L.Callback):
    """Records which images each rank saw (by pixel sum) and dumps its EMA weights at the end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([hash(x.numpy().tobytes()) for x in batch])

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "seen": self.seen,
                "ema": [p.clone() for p in pl_module.ema.shadow_params],
                "world_size": trainer.world_size,
            },
            self.path / f"rank{trainer.global_rank}.pt",
        )


class RecordStepLosses(L.Callback):
    """Keeps the loss of every training batch (micro-batch), in order, for tests of logged means."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
