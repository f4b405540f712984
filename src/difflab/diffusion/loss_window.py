"""The training loss as logged: means over a logging window, accumulated on the device.

Per step, the loss and the loss per timestep quartile are added into device tensors: no host sync,
and one ``self.log`` per window instead of per step (each costs ~0.3 ms of Python, 1% of a ``tiny``
step on CPU). The window's sums travel in checkpoints, so logged means resume exactly.

Under DDP each rank keeps its own window: plain tensors, not module buffers, which DDP would overwrite
with rank 0's on every forward (``broadcast_buffers``).
"""

from __future__ import annotations

from typing import Any

import torch


class LossWindow:
    """Sums of the loss (per step) and of the per-sample loss per timestep quartile, since the last reset."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self.loss_sum = torch.zeros(())
        self.q_sum = torch.zeros(4)
        self.q_count = torch.zeros(4)
        self.steps = 0  # micro-batches added since the last reset

    def _follow(self, device: torch.device) -> None:
        # Not buffers, so Module.to does not move them: they follow the losses (a check, no sync).
        if self.loss_sum.device != device:
            self.loss_sum, self.q_sum, self.q_count = (
                t.to(device) for t in (self.loss_sum, self.q_sum, self.q_count)
            )

    def unshare(self) -> None:
        """Private storage for tensors a spawned DDP worker received in shared memory (ddp_spawn):
        shared, every rank would add into one window and log N times its loss."""
        self.loss_sum, self.q_sum, self.q_count = (
            t.clone() if t.is_shared() else t for t in (self.loss_sum, self.q_sum, self.q_count)
        )

    @torch.no_grad()
    def add(self, loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """One micro-batch: its (weighted) loss and each sample's loss at its timestep ``t``."""
        self._follow(loss.device)
        q = (t * 4 // self.num_timesteps).long().clamp(max=3)  # float timesteps under flow matching
        self.loss_sum.add_(loss.detach().float())
        self.q_sum.index_add_(0, q, per_sample.detach().float())
        self.q_count.index_add_(0, q, torch.ones_like(per_sample, dtype=torch.float32))
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        """``train/loss`` and ``train/loss_q0..3`` over the window (device tensors, no sync)."""
        quartiles = self.q_sum / self.q_count.clamp(min=1)
        return {"train/loss": self.loss_sum / max(self.steps, 1)} | {
            f"train/loss_q{i}": quartiles[i] for i in range(4)
        }

    def finite(self) -> torch.Tensor:
        """A bool tensor: no NaN/Inf loss in the window (one NaN step poisons the sum)."""
        return self.loss_sum.isfinite()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.q_sum.zero_()
        self.q_count.zero_()
        self.steps = 0

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.clone(),
            "q_sum": self.q_sum.clone(),
            "q_count": self.q_count.clone(),
            "steps": self.steps,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.loss_sum.device, torch.float32).clone()
        self.q_sum = state["q_sum"].to(self.q_sum.device, torch.float32).clone()
        self.q_count = state["q_count"].to(self.q_count.device, torch.float32).clone()
        self.steps = int(state["steps"])
