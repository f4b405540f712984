"""The forward noise process and the training objective, kept apart from the network.

The diffusers ``DDPMScheduler`` owns the schedule (betas, alphas_cumprod); this module turns it into
a training target per prediction type and the min-SNR-γ loss weights (Hang et al. 2023).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from difflab.rules import Above, AtLeast, Between

# What the network predicts, and the β schedules diffusers' DDPMScheduler computes (difflab tests each).
PredictionType = Literal["epsilon", "sample", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def noise_schedule(
    *,
    num_train_timesteps: Annotated[int, AtLeast(2)],
    beta_schedule: BetaSchedule,
    beta_start: Annotated[float, Above(0)],
    beta_end: Annotated[float, Between(0, 1)],
    prediction_type: PredictionType,
    rescale_betas_zero_snr: bool,
    clip_sample: bool,
    **more: Any,
) -> DDPMScheduler:
    """diffusers' ``DDPMScheduler`` (model.noise_scheduler), with these settings typed: diffusers takes
    any string and fails late (an unknown prediction type only at the first loss). ``more``: any other
    DDPMScheduler setting, passed on."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        clip_sample=clip_sample,
        **more,
    )


class NoiseProcess:
    """q(x_t | x_0) plus the regression target and per-timestep loss weights for one prediction type."""

    def __init__(self, scheduler: DDPMScheduler, min_snr_gamma: float | None = None) -> None:
        pt = scheduler.config.prediction_type
        if pt not in get_args(PredictionType):
            allowed = ", ".join(get_args(PredictionType))
            raise ValueError(f"prediction_type={pt!r} is not valid; allowed: {allowed}")
        self.scheduler = scheduler
        self.prediction_type = pt
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.min_snr_gamma = min_snr_gamma
        # SNR(t) = ᾱ_t / (1 - ᾱ_t), tabulated once by diffusers' own helper; infinite SNR never occurs
        # (ᾱ < 1), zero SNR can (zero-terminal-SNR).
        self.snr = compute_snr(scheduler, torch.arange(self.num_timesteps)).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.scheduler.get_velocity(x0, noise, t)  # v = α_t·ε − σ_t·x0

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights expressed for the network's target (all ones when γ is unset)."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            # ε-loss = SNR·x0-loss, so weight min(SNR, γ)/SNR; at zero SNR the ε target is exact: weight 1.
            return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1)  # v-loss = (SNR + 1)·x0-loss
