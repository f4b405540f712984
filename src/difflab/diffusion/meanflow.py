"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): a network that samples in one or a few steps.

Same path as flow matching (diffusion/noise.py ``FlowProcess``): z_t = (1−t)·x + t·ε for t in [0, 1],
velocity v = ε − x = dz_t/dt. The network learns the *average* velocity over [r, t]

    u(z_t, r, t) = 1/(t−r) · ∫_r^t v(z_τ, τ) dτ,       so   z_r = z_t − (t−r)·u(z_t, r, t)

is one exact jump (one network evaluation for r = 0, t = 1). Differentiating (t−r)·u along the path
gives the MeanFlow identity, the regression target:

    u(z_t, r, t) = v − (t−r)·du/dt,      du/dt = ∂u/∂z·v + ∂u/∂t      (r held fixed)

du/dt is one forward-mode JVP of the network with tangents (v, 0, 1) for (z, r, t), computed in the
same pass as u itself (``torch.autograd.forward_ad``), with the gradient stopped on the target. At
r = t the target is v: plain flow matching, so a flow model is a MeanFlow model at r = t.

The network: diffusers' ``UNet2DModel`` with ``class_embed_type="timestep"``, its timestep input t·T
and its class-embedding input (t−r)·T (T = num_train_timesteps, as for flow): the second time goes
through diffusers' own sinusoidal projection and embedding MLP, so checkpoints stay diffusers' class.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab.diffusion.noise import FlowProcess, NoiseLevels
from difflab.diffusion.pipeline import MeanFlowScheduler
from difflab.rules import Above, AtLeast, Between


def meanflow_schedule(
    *,
    num_train_timesteps: Annotated[int, AtLeast(2)],
    ratio: Annotated[float, Between(0, 1)],
    adaptive_p: Annotated[float, AtLeast(0)],
    adaptive_c: Annotated[float, Above(0)],
    objective: Literal["meanflow"] = "meanflow",
) -> MeanFlowScheduler:
    """``MeanFlowScheduler`` with its settings typed (the start-up check reads the hints); ``objective``
    marks the config as MeanFlow's before it is built (noise.objective_of)."""
    return MeanFlowScheduler(
        num_train_timesteps=num_train_timesteps, ratio=ratio, adaptive_p=adaptive_p, adaptive_c=adaptive_c
    )


class MeanFlowProcess(FlowProcess):
    """The ``meanflow`` objective: the flow path, the average-velocity target from one JVP, (t, r)
    drawn from the noise-level density, and the adaptive loss weight."""

    objective = "meanflow"

    def __init__(
        self,
        scheduler: MeanFlowScheduler,
        levels: NoiseLevels | None = None,
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__(scheduler, levels, min_snr_gamma)
        self.ratio = float(scheduler.config.ratio)
        self.p, self.c = float(scheduler.config.adaptive_p), float(scheduler.config.adaptive_c)

    def prediction_and_target(
        self, unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A second level from the same density and the step's generator (an exact resume redraws it):
        # t the larger, r the smaller, for the first round(ratio·n) samples (the batch comes in random
        # order); the rest get r = t. A fixed count, as in the paper's code: the split needs no host sync.
        n, device = x0.shape[0], x0.device
        k = round(self.ratio * n)
        other = self.timesteps(n, g, device)
        t, r = torch.maximum(t, other), torch.minimum(t, other)
        r = torch.cat([r[:k], t[k:]])
        us, targets = [], []
        if k:
            u, target = self.average_velocity_and_target(unet, x0[:k], noise[:k], t[:k], r[:k])
            us, targets = [u.float()], [target.float()]
        if k < n:
            # r = t: the target is the velocity itself and needs no JVP, so these samples take a plain
            # pass (under autocast, where the run has it). With every sample through the JVP pass a step
            # cost 2.45x [2.25, 2.50] a flow step at 32-true (raw/meanflow_cost.jsonl, its first run).
            x, eps, times = x0[k:], noise[k:], t[k:]
            us.append(unet(self.add_noise(x, eps, times), times, class_labels=times * 0).sample.float())
            targets.append(self.target(x, eps, times).float())
        return torch.cat(us), torch.cat(targets), t

    def average_velocity_and_target(
        self, unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u_θ(z_t, r, t) and its target v − (t−r)·du/dt (gradient stopped), for network timesteps
        t ≥ r (in units of T), in one forward pass carrying the JVP's tangents."""
        scale = float(self.num_timesteps)
        z, v = self.add_noise(x0, noise, t), self.target(x0, noise, t)
        ones = torch.full_like(t, scale)  # d(t·T)/dt and d((t−r)·T)/dt: the inputs are scaled by T
        # Without autocast: under it a convolution casts a dual input's primal but not its tangent and
        # fails on the mixed dtypes (PyTorch 2.14; torch.func.jvp alike), so a bf16-mixed or 16-mixed
        # run computes this pass in the weights' dtype. Forward-mode AD has no formula for PyTorch's
        # fused (flash) attention kernels; the math kernel has one.
        with torch.autocast(x0.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
            out = unet(
                fwAD.make_dual(z, v), fwAD.make_dual(t, ones), class_labels=fwAD.make_dual(t - r, ones)
            ).sample
            u, du_dt = fwAD.unpack_dual(out)
        target = v - ((t - r) / scale).to(v.dtype).view(-1, 1, 1, 1) * du_dt
        return u, target.detach()

    def objective_loss(self, weighted: torch.Tensor) -> torch.Tensor:
        """Σ w·‖Δ‖² / n with w = 1/(‖Δ‖² + c)^p, gradient stopped on w (p = 1: each sample's term is about
        ‖Δ‖²/(‖Δ‖² + c), robust to the large errors of the JVP target; p = 0: plain MSE). The loggers
        keep the plain mean of ‖Δ‖², comparable across steps and runs."""
        if self.p == 0:
            return weighted.mean()
        return (weighted * (weighted.detach() + self.c).pow(-self.p)).mean()


def meanflow_settings_problems(model: dict[str, Any]) -> list[str]:
    """Lines for the model settings MeanFlow cannot take (DiffusionModule.settings_problems calls it)."""
    problems = []
    embed = (model.get("unet") or {}).get("class_embed_type")
    if embed != "timestep":
        embed = "null" if embed is None else embed
        problems.append(
            f"unet.class_embed_type={embed} has no slot for MeanFlow's second time (t − r); "
            "model=meanflow sets model.unet.class_embed_type=timestep"
        )
    if model.get("min_snr_gamma") is not None:
        problems.append(
            f"min_snr_gamma={model['min_snr_gamma']}: MeanFlow weights its loss adaptively "
            "(model.noise_scheduler.adaptive_p); give model.min_snr_gamma=null"
        )
    if model.get("learned_weighting"):
        problems.append(
            "learned_weighting=true: MeanFlow weights its loss adaptively "
            "(model.noise_scheduler.adaptive_p); give model.learned_weighting=false"
        )
    return problems
