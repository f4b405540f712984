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


class KillAt(L.Callback):
    """SIGKILLs the run's whole process group at a chosen moment, as a crash or ``kill -9`` would.

    ``moment``: ``step`` (optimizer step ``step`` done, before its checkpoint is written),
    ``after_save`` (the checkpoint of step ``step`` is on disk, the next step has not begun),
    ``during_save`` (halfway through writing the checkpoint of step ``step``).
    """

    def __init__(self, step: int, moment: str = "step") -> None:
        assert moment in ("step", "after_save", "during_save"), moment
        self.step, self.moment = step, moment

    @staticmethod
    def _kill() -> None:
        import os
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.moment != "during_save":
            return
        import difflab.checkpoints as ckpts

        real_save, step = torch.save, self.step

        def half_then_die(obj, f, *args, **kwargs):  # only checkpoint writes go through this name
            if trainer.global_step == step:
                import io

                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                KillAt._kill()
            return real_save(obj, f, *args, **kwargs)

        ckpts.torch = _TorchWithSave(half_then_die)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.moment == "step" and trainer.global_step == self.step:
            self._kill()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.moment == "after_save" and trainer.global_step == self.step:
            self._kill()


class _TorchWithSave:
    """``torch`` with ``save`` replaced (patches the name in one module only)."""

    def __init__(self, save) -> None:
        self.save = save

    def __getattr__(self, name: str):
        return getattr(torch, name)
