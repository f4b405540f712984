"""Learned loss weighting: one uncertainty per noise level, trained with the network (Karras et al.
2024, EDM2, eq. 4 and its appendix "uncertainty-based multi-task loss").

A fixed weighting (plain MSE, min-SNR-γ) must guess how hard each noise level is; that changes as the
network learns. EDM2 instead treats every noise level as a task of its own, with a learned log-variance
u(λ) of its loss (Kendall et al. 2018's multi-task uncertainty):

    L = E[ L_λ / e^{u(λ)} + u(λ) ]        L_λ: the per-sample (already weighted) loss at log-SNR λ

For a fixed network, the best u is log E[L_λ | λ]: each level's loss is divided by its own current
mean, so every noise level sends a gradient of the same size, easy ones and hard ones alike, and the
balance tracks training as it goes. u reads λ through fixed random Fourier features of c = −λ/8
(EDM2's ln σ / 4, with σ = e^{−λ/2}) and one linear layer; it starts at zero (the plain loss) and the
UNet's own optimizer trains it. Sampling never uses it: only the UNet is exported or sampled.
Written here because diffusers and Lightning have no learned loss weighting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Fourier features of the noise level (EDM2's logvar_channels).
CHANNELS = 128
# λ = log SNR is ±∞ at σ = 0 or 1 (flow) and at a zero-terminal-SNR step: the features need finite input.
LOG_SNR_RANGE = 30.0


class LearnedWeighting(nn.Module):
    """u(λ), the learned log-variance of the loss at log-SNR λ; ``forward`` applies it to a loss."""

    def __init__(self, channels: int = CHANNELS, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # Buffers, not parameters: fixed after construction, saved in checkpoints with the weights.
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.weight = nn.Parameter(torch.zeros(channels))  # zero: u = 0, the plain loss, at step 0
        self.bias = nn.Parameter(torch.zeros(()))

    def log_variance(self, log_snr: torch.Tensor) -> torch.Tensor:
        """u for each sample's log-SNR, float32. A sum rather than a matmul: autocast would lower it."""
        c = -log_snr.float().clamp(-LOG_SNR_RANGE, LOG_SNR_RANGE) / 8
        features = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)  # unit variance
        return (features * self.weight).sum(dim=1) + self.bias

    def forward(self, per_sample: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        """The per-sample objective L/e^u + u (its batch mean is what training minimises)."""
        u = self.log_variance(log_snr)
        return per_sample * torch.exp(-u) + u
