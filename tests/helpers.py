"""Test-only callbacks, importable by spawned DDP workers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def image_digest(image: torch.Tensor) -> str:
    """The same string for the same pixels in every process (Python's bytes hash is salted per process)."""
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16]


class DumpRankState(L.Callback):
    """Records which images each rank saw (by digest) and dumps its EMA weights at the end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([image_digest(x) for x in batch])

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "seen": self.seen,
                "ema": [p.clone() for p in pl_module.ema.shadow_params],
                # ddp_spawn: shared EMA storage would be updated by every rank (N times too fast)
                "ema_shared": any(p.is_shared() for p in pl_module.ema.shadow_params),
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
    ``during_save`` (halfway through writing the checkpoint of step ``step``),
    ``during_last_save`` (halfway through writing ``last.ckpt`` at step ``step``, its step file done),
    ``before_remove`` (the checkpoint of step ``step`` is written, the top-k file it replaces not yet
    deleted).
    """

    MOMENTS = ("step", "after_save", "during_save", "during_last_save", "before_remove")

    def __init__(self, step: int, moment: str = "step") -> None:
        assert moment in self.MOMENTS, moment
        self.step, self.moment = step, moment

    @staticmethod
    def _kill() -> None:
        import os
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.moment == "before_remove":
            io, step = trainer.strategy.checkpoint_io, self.step
            real_remove = io.remove_checkpoint

            def die_then_remove(path, *args, **kwargs):
                if trainer.global_step == step:
                    KillAt._kill()
                return real_remove(path, *args, **kwargs)

            io.remove_checkpoint = die_then_remove
        if self.moment not in ("during_save", "during_last_save"):
            return
        import difflab.checkpoints as ckpts

        real_save, step, only_last = torch.save, self.step, self.moment == "during_last_save"

        def half_then_die(obj, f, *args, **kwargs):  # only checkpoint writes go through this name
            name = str(getattr(getattr(f, "f", f), "name", ""))  # atomic_write's file: .<name>.tmp
            if trainer.global_step == step and (not only_last or name.endswith("last.ckpt.tmp")):
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


class Crash(Exception):
    """What CrashAt raises."""


class CrashAt(L.Callback):
    """Raises ``Crash`` when optimizer step ``step`` is done, before its checkpoint is written: the files
    on disk are those a ``kill -9`` there leaves (KillAt's ``step``), in-process and without a new
    interpreter per run, for short tests."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


class _TorchWithSave:
    """``torch`` with ``save`` replaced (patches the name in one module only)."""

    def __init__(self, save) -> None:
        self.save = save

    def __getattr__(self, name: str):
        return getattr(torch, name)


def difflab_cli(
    command: str, *args: str, cwd, timeout: int = 600, new_group: bool = False
) -> subprocess.CompletedProcess:
    """Run ``difflab-<command> args`` as a user would (its own process group with ``new_group``, so a
    KillAt callback kills it and its DDP workers, never pytest)."""
    env = {**os.environ, "WANDB_MODE": "", "WANDB_API_KEY": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(BIN / f"difflab-{command}"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        start_new_session=new_group,
    )


def max_abs_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest |a-b| between two checkpoints' live weights, optimizer states and EMA weights."""

    def flat(x) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return [x.float()]
        if isinstance(x, dict):
            return [t for k in sorted(x, key=str) for t in flat(x[k])]
        if isinstance(x, list | tuple):
            return [t for v in x for t in flat(v)]
        return []

    def diff(x, y) -> float:
        xs, ys = flat(x), flat(y)
        assert len(xs) == len(ys) and xs, "checkpoints hold different tensors"
        return max((u - v).abs().max().item() if u.numel() else 0.0 for u, v in zip(xs, ys, strict=True))

    return {
        "weights": diff(a["state_dict"], b["state_dict"]),
        "optimizer": diff(a["optimizer_states"], b["optimizer_states"]),
        "ema": diff(a["ema"], b["ema"]),
    }


def train_cli(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """``difflab-train args`` in a subprocess."""
    return difflab_cli("train", *args, cwd=cwd, timeout=timeout)


# The machine record of benchmark fixtures (protocol.machine()'s fields), shared by the report tests.
BENCH_MACHINE = {
    "cpu": "Test CPU",
    "cores": 2,
    "amx": False,
    "avx512_bf16": True,
    "gpu": None,
    "torch": "0",
    "lightning": "0",
    "diffusers": "0",
    "python": "3",
    "commit": "abc",
    "dirty": False,
}
