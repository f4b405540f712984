"""The denoiser: diffusers' ``UNet2DModel`` with a constant-time ``dtype`` and fast CPU bf16 attention."""

from __future__ import annotations

import diffusers
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class UNet2DModel(diffusers.UNet2DModel):
    """diffusers' ``UNet2DModel``; same weights, config and saved format, two methods changed.

    diffusers' ``dtype`` walks every submodule looking for layer-wise casting hooks, and ``forward``
    reads it on every call: 0.22 ms a call on a 2-core CPU (0.8% of a ``tiny`` training step, and
    paid again by every sampler step). difflab attaches no such hooks, so the first parameter's dtype
    is the answer. A model saved from this class loads as ``diffusers.UNet2DModel`` (same ``_class_name``).
    """

    @property
    def dtype(self) -> torch.dtype:
        for param in self.parameters():
            return param.dtype
        return super().dtype

    def forward(self, sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        """diffusers' forward; on CPU in bf16 its attention runs on PyTorch's math kernel: PyTorch's own
        choice (the flash kernel) has a slow bf16 backward on CPU, and a bf16 forward+backward of the
        `small` UNet runs 1.10x [1.09, 1.14] faster with the math kernel (RESULTS.md "speed_levers")."""
        if sample.device.type == "cpu" and (
            sample.dtype == torch.bfloat16
            or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        ):
            with sdpa_kernel(SDPBackend.MATH):
                return super().forward(sample, *args, **kwargs)
        return super().forward(sample, *args, **kwargs)
