"""A guide trained alongside the model (``model/guide=tiny``): autoguidance's weaker network
(diffusion/guidance.py) for a fraction of each training step, sampled with ``guide=alongside``.

EDM2's best guides (Karras et al. 2024, arXiv 2406.02507, sec. 3) are smaller *and* shorter-trained than
the model. This one is a small UNet trained on the first ``batch_fraction`` of every batch, with the
model's noise and noise levels for those images, for the first ``duration`` of the run's optimizer
steps; after that it and its EMA stay frozen.

It never changes how the model trains: its parameters are their own param group of the run's optimizer
with their own learning rate (Lightning's automatic optimization steps one optimizer; AdamW works per
parameter, so a group is a separate AdamW with the same β, ε and weight decay), their gradient norm
is clipped on its own (``clip_each_group``), and its forward pass comes after the model's, so the
model's noise draws are untouched: the model's weights are bit for bit those of a run without a guide
(tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch import nn

from difflab.rules import Above, Between

# The guide= shorthand for the guide a run trained alongside (model.guide), read from its checkpoint.
ALONGSIDE = "alongside"


class TrainedGuide(nn.Module):
    """``unet`` trained alongside the model, with its own EMA (``ema``, a partial taking the UNet; the
    guide samples with its EMA weights as the model does)."""

    def __init__(
        self,
        unet: UNet2DModel,
        ema: Callable[[nn.Module], EMAModel] | None = None,
        batch_fraction: Annotated[float, Above(0), Between(0, 1)] = 0.25,
        duration: Annotated[float, Above(0), Between(0, 1)] = 0.25,
        lr: Annotated[float, Above(0)] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.ema = ema(unet) if ema is not None else None
        self.batch_fraction, self.duration, self.lr = batch_fraction, duration, lr

    def batch_size(self, n: int) -> int:
        """How many of a batch's ``n`` images the guide trains on (at least one)."""
        return max(1, round(self.batch_fraction * n))

    def steps(self, total: int) -> int:
        """The optimizer steps the guide trains for, of a run of ``total``: steps 0 … steps − 1."""
        return max(1, round(self.duration * total))

    def idle_loss(self) -> torch.Tensor:
        """0·Σp: zero gradients for a guide past its duration, under DDP, where every parameter of the
        wrapped module must get a gradient each step (the reducer waits for all of them); a gradient of
        zero at learning rate 0 (DiffusionModule's schedule) leaves the weights as they are. A single
        process gives the frozen guide no gradient at all: the optimizer skips it."""
        return torch.stack([p.sum() for p in self.unet.parameters()]).sum() * 0.0


def clip_each_group(optimizer: torch.optim.Optimizer, max_norm: float, algorithm: str) -> None:
    """Clip each param group's gradients (the model's, the guide's) as Lightning clips a whole
    optimizer's, so neither network's gradient norm scales the other's."""
    for group in optimizer.param_groups:
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(group["params"], max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(group["params"], max_norm)
