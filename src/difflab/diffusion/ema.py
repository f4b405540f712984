"""EMA of the UNet weights, kept by the LightningModule (outside DDP's wrapper) and used for sampling.

The average itself is diffusers' ``EMAModel`` with its warm-up schedule
decay(step) = min(max_decay, 1 − (1 + step/inv_gamma)^(−power)).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


def build_ema(
    model: torch.nn.Module,
    max_decay: float = 0.9999,
    inv_gamma: float = 1.0,
    power: float = 0.75,
    update_after_step: int = 0,
    min_decay: float = 0.0,
    foreach: bool = True,
) -> EMAModel:
    return EMAModel(
        model.parameters(),
        decay=max_decay,
        min_decay=min_decay,
        update_after_step=update_after_step,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
        foreach=foreach,
    )


def warmup_decay(
    step: int, max_decay: float, inv_gamma: float, power: float, update_after_step: int = 0
) -> float:
    """The decay EMAModel applies at optimisation step ``step`` (1-based), written out independently."""
    k = max(0, step - update_after_step - 1)
    if k == 0:
        return 0.0
    return min(max_decay, 1 - (1 + k / inv_gamma) ** -power)


@contextmanager
def swapped_in(ema: EMAModel | None, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily load the EMA weights into ``model``; the live weights come back even on error."""
    if ema is None:
        yield model
        return
    params = list(model.parameters())
    backup = [p.detach().clone() for p in params]
    try:
        ema.copy_to(params)
        yield model
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
