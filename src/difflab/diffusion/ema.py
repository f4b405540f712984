"""EMA of the UNet weights, kept by the LightningModule (outside DDP's wrapper) and used for sampling.

The average itself is diffusers' ``EMAModel`` (with a one-pass update) and its warm-up schedule
decay(step) = min(max_decay, 1 − (1 + step/inv_gamma)^(−power)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
from diffusers.training_utils import EMAModel

from difflab.rules import Above, AtLeast, Between


class LerpEMAModel(EMAModel):
    """diffusers' ``EMAModel`` with a one-pass update: s ← lerp(s, p, 1 − decay).

    diffusers' foreach step writes s − p into new tensors and then subtracts them in a second pass;
    ``_foreach_lerp_`` reads each tensor once and allocates nothing (31 → 16 ms a step for the 35.7M
    UNet on a 2-core CPU). Decay schedule, state dict and copy_to are diffusers' own.

    The EMA interface the LightningModule uses (shared with posthoc.PowerFunctionEMA): ``step``,
    ``copy_to``, ``state_dict`` / ``load_state_dict``, ``all_shadows`` / ``map_shadows``, ``kind`` (as the
    checkpoint records it) and ``snapshot`` (a standard EMA keeps none).
    """

    kind = "standard"
    snapshot_dir = None

    def snapshot(self, end_of_run: bool = False) -> None:
        """A standard EMA writes no snapshots (post-hoc EMA does)."""

    def all_shadows(self) -> list[torch.Tensor]:
        """Every averaged tensor (one profile here; post-hoc EMA keeps several)."""
        return list(self.shadow_params)

    def map_shadows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every averaged tensor ``s`` by ``fn(s)`` (device, memory format, private copies)."""
        self.shadow_params = [fn(s) for s in self.shadow_params]

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if not self.foreach:
            super().step(parameters)
            return
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if not p.requires_grad]
        if trained:
            shadow, params = map(list, zip(*trained, strict=True))
            torch._foreach_lerp_(shadow, params, 1 - decay)
        if frozen:
            shadow, params = map(list, zip(*frozen, strict=True))
            torch._foreach_copy_(shadow, params)


def build_ema(
    model: torch.nn.Module,
    max_decay: Annotated[float, Between(0, 1)] = 0.9999,
    inv_gamma: Annotated[float, Above(0)] = 1.0,
    power: Annotated[float, Above(0)] = 0.75,
    update_after_step: Annotated[int, AtLeast(0)] = 0,
    min_decay: Annotated[float, Between(0, 1)] = 0.0,
    foreach: bool = True,
) -> EMAModel:
    """The EMA of ``model``'s weights (model.ema in the config, a partial taking the UNet)."""
    return LerpEMAModel(
        model.parameters(),
        decay=max_decay,
        min_decay=min_decay,
        update_after_step=update_after_step,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
        foreach=foreach,
    )


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
