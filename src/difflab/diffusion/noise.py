"""The forward noise process and the training objective, kept apart from the network.

Two objectives, each defined by the diffusers scheduler that owns its schedule:

- ``ddpm`` (``DDPMScheduler``): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at an integer t in [0, T); the network
  predicts ε, x0 ("sample") or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.
- ``flow`` (``FlowMatchEulerDiscreteScheduler``; rectified flow, Liu et al. 2023 / Lipman et al.
  2023): x_σ = (1−σ)·x0 + σ·ε for σ in (0, 1); the network sees the timestep σ·T (diffusers'
  convention, so its flow samplers drive it) and predicts the velocity v = ε − x0.
- ``meanflow`` (diffusion/meanflow.py): the flow path, the network predicting the average velocity
  over an interval, for one- and few-step sampling.

Both draw u in (0, 1) from one timestep density (uniform, or logit-normal as in SD3, Esser et al.
2024, which spends the steps on mid noise levels) and map it to t = ⌊u·T⌋ or σ = u. Stratified, a
batch of n takes the density's quantiles at (r + i)/n mod 1 for one uniform r (the low-discrepancy
sampler of Kingma et al. 2021): each draw is still from the density, but every batch covers it
evenly, so the batch's loss (which depends strongly on the noise level) varies less between steps.

Loss weighting, all in ``loss_weights``: plain MSE on the network's target (weight 1), or min-SNR-γ
(Hang et al. 2023), which weights the x0-error by min(SNR, γ). Per target that is, with
SNR = signal²/noise² at the timestep:

    ddpm ε        min(SNR, γ) / SNR       (ε-error = SNR · x0-error)
    ddpm x0       min(SNR, γ)
    ddpm v        min(SNR, γ) / (SNR+1)   (v-error = (SNR+1) · x0-error)
    flow v        min(SNR, γ) · σ²        (v-error = x0-error / σ², SNR = ((1−σ)/σ)²)

On top of either, ``model.learned_weighting`` divides each level's weighted loss by a learned estimate
of its mean (diffusion/weighting.py), reading the level as λ = log SNR from ``log_snr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from difflab.rules import Above, AtLeast, Between

# What the network predicts, and the β schedules diffusers' DDPMScheduler computes (difflab tests each).
PredictionType = Literal["epsilon", "sample", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
Objective = Literal["ddpm", "flow", "meanflow"]
# How training draws noise levels: u ~ U(0, 1), or u = sigmoid(n), n ~ N(logit_mean, logit_std²).
TimestepDensity = Literal["uniform", "logit_normal"]
TrainScheduler = DDPMScheduler | FlowMatchEulerDiscreteScheduler


def objective_of(scheduler_config: Any) -> Objective:
    """The objective a (checkpoint's, pipeline's or config's) training scheduler config belongs to:
    MeanFlow's says so, flow configs carry a ``shift`` and no betas."""
    if scheduler_config.get("objective") == "meanflow":
        return "meanflow"
    return "flow" if "shift" in scheduler_config and "beta_start" not in scheduler_config else "ddpm"


def scheduler_class(objective: Objective) -> type[TrainScheduler]:
    return FlowMatchEulerDiscreteScheduler if objective == "flow" else DDPMScheduler


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


def flow_schedule(
    *, num_train_timesteps: Annotated[int, AtLeast(2)], shift: Annotated[float, Above(0)], **more: Any
) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (model.noise_scheduler under model=flow): the
    timestep scale T and the sampling shift (σ → shift·σ/(1 + (shift−1)·σ), more steps at high noise).
    ``more``: any other setting of it, passed on."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift, **more)


@dataclass(frozen=True)
class NoiseLevels:
    """How training draws noise levels u in [0, 1): the density (uniform, or logit-normal: u = sigmoid(n),
    n ~ N(logit_mean, logit_std²)) and whether a batch takes stratified quantiles of it. Built by Hydra
    from ``model.noise_levels`` and handed whole to the noise process: a new knob is a field here and its
    line in conf/model/ddpm.yaml."""

    density: TimestepDensity = "uniform"
    logit_mean: float = 0.0
    logit_std: Annotated[float, Above(0)] = 1.0
    stratified: bool = False

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """n noise levels u in [0, 1), float32. Written here rather than with diffusers'
        ``compute_density_for_timestep_sampling``: that one draws from the global RNG, and every draw
        here comes from the step's own generator (an exact resume redraws them)."""
        mean, std = self.logit_mean, self.logit_std
        if not self.stratified:  # i.i.d. (the draws of runs made before stratified existed)
            if self.density == "uniform":
                return torch.rand(n, generator=generator, device=device)
            return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
        offset = torch.rand(1, generator=generator, device=device)
        q = (offset + torch.arange(n, device=device) / n) % 1  # n evenly spaced quantiles, one random shift
        # Through the density's inverse CDF; q = 0 gives u = 0, which the processes clamp or floor.
        return q if self.density == "uniform" else torch.sigmoid(mean + std * torch.special.ndtri(q))


class NoiseProcess(nn.Module):
    """q(x_t | x_0) plus the regression target and per-timestep loss weights for one prediction type
    of the ``ddpm`` objective; ``FlowProcess`` is the same job for ``flow``. A module only so that its
    SNR table is a buffer: it moves to the GPU once, with the LightningModule it belongs to."""

    objective: Objective = "ddpm"

    def __init__(
        self, scheduler: TrainScheduler, levels: NoiseLevels | None = None, min_snr_gamma: float | None = None
    ) -> None:
        super().__init__()
        self.scheduler, self.min_snr_gamma = scheduler, min_snr_gamma
        self.levels = levels or NoiseLevels()
        self.num_timesteps = scheduler.config.num_train_timesteps
        self._prepare(scheduler)

    def _prepare(self, scheduler: DDPMScheduler) -> None:
        """What this objective needs from its scheduler: the prediction type and the SNR table."""
        pt = scheduler.config.prediction_type
        if pt not in get_args(PredictionType):
            allowed = ", ".join(get_args(PredictionType))
            raise ValueError(f"prediction_type={pt!r} is not valid; allowed: {allowed}")
        self.prediction_type = pt
        # SNR(t) = ᾱ_t / (1 - ᾱ_t), tabulated once by diffusers' own helper; infinite SNR never occurs
        # (ᾱ < 1), zero SNR can (zero-terminal-SNR).
        # Not persistent: rebuilt from the scheduler config, which checkpoints keep.
        self.register_buffer(
            "snr", compute_snr(scheduler, torch.arange(self.num_timesteps)).float(), persistent=False
        )

    def timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The network's timestep input for n samples: integers in [0, T)."""
        # Uniform i.i.d.: the same stream as before densities existed.
        if self.levels.density == "uniform" and not self.levels.stratified:
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return (
            (self._levels(n, generator, device) * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        )

    def _levels(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.levels.draw(n, generator, device)

    def prediction_and_target(
        self, unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's output on the noised batch, its regression target, and the timesteps the
        loss is binned and weighted by (``t``, unless the objective draws more from ``g``)."""
        return unet(self.add_noise(x0, noise, t), t).sample, self.target(x0, noise, t), t

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
        snr = self.snr_at(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            # ε-loss = SNR·x0-loss, so weight min(SNR, γ)/SNR; at zero SNR the ε target is exact: weight 1.
            return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1)  # v-loss = (SNR + 1)·x0-loss

    def objective_loss(self, weighted: torch.Tensor) -> torch.Tensor:
        """What training minimises, from each sample's weighted loss (the loggers keep their mean)."""
        return weighted.mean()

    def snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """SNR = signal²/noise² at each timestep, float32 (min-SNR-γ and the learned weighting read it)."""
        return self.snr[t]  # a buffer on t's device: a per-step .to() was a host-to-device copy

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ = log SNR at each timestep (−∞ at a zero-terminal-SNR step): the noise level as the
        learned loss weighting reads it, the same scale for both objectives."""
        return self.snr_at(t).log()


class FlowProcess(NoiseProcess):
    """The ``flow`` objective: x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0, timestep input σ·T."""

    objective: Objective = "flow"

    def _prepare(self, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        self.prediction_type = "velocity"  # fixed; SNR((1−σ)/σ)² is computed in loss_weights

    def timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """σ·T, float, with σ in (0, 1): the network never sees σ = 0 exactly (nothing to denoise)."""
        return self._levels(n, generator, device).clamp(1e-5, 1.0) * self.num_timesteps

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t / self.num_timesteps).to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        sigma = (t / self.num_timesteps).float()
        return self.snr_at(t).clamp(max=self.min_snr_gamma) * sigma**2

    def snr_at(self, t: torch.Tensor) -> torch.Tensor:
        sigma = (t / self.num_timesteps).float()
        return ((1 - sigma) / sigma) ** 2


def noise_process(
    scheduler: TrainScheduler, levels: NoiseLevels | None = None, min_snr_gamma: float | None = None
) -> NoiseProcess:
    """The process for the training scheduler's objective."""
    from difflab.diffusion.meanflow import MeanFlowProcess  # it builds on FlowProcess, defined here

    if objective_of(scheduler.config) == "meanflow":
        return MeanFlowProcess(scheduler, levels, min_snr_gamma)
    cls = FlowProcess if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else NoiseProcess
    return cls(scheduler, levels, min_snr_gamma)


def immiscible_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` reordered so the batch's images and noises are paired by a minimum total L2 distance
    (Immiscible Diffusion, Li et al. 2024): each image is noised towards a nearby noise, which
    untangles the noise-to-image mapping the network must learn. The assignment is Hungarian
    (``scipy.optimize.linear_sum_assignment``) on the host: one sync and O(B³) per step, the cost
    of this option (measured in experiments/benchmarks)."""
    from scipy.optimize import linear_sum_assignment

    dist = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())
    _, cols = linear_sum_assignment(dist.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]
