"""The denoiser: diffusers' ``UNet2DModel`` with a constant-time ``dtype`` and fast CPU bf16 attention."""

from __future__ import annotations

import diffusers
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class UNet2DModel(diffusers.UNet2DModel):
    """diffusers' ``UNet2DModel``; same weights, config and saved format, two methods changed (and the
    dtype of a "timestep" class embedding's input fixed).

    diffusers' ``dtype`` walks every submodule looking for layer-wise casting hooks, and ``forward``
    reads it on every call: 0.22 ms a call on a 2-core CPU (0.8% of a ``tiny`` training step, and
    paid again by every sampler step). difflab attaches no such hooks, so the first parameter's dtype
    is the answer. A model saved from this class loads as ``diffusers.UNet2DModel`` (same ``_class_name``).
    """

    def _in_weights_dtype(self, module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        for param in self.parameters():
            return param.dtype
        return super().dtype

    def forward(self, sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        if self.config.class_embed_type == "timestep" and not getattr(self, "_proj_cast", False):
            # diffusers casts the sinusoidal projection of the timestep to the weights' dtype but not
            # that of a "timestep" class embedding (MeanFlow's second time): with bf16 or float64
            # weights its Linear met a float32 input and failed. Hooked here, not in __init__, whose
            # signature diffusers' from_config reads; a bound method, so ddp_spawn can pickle it.
            self.time_proj.register_forward_hook(self._in_weights_dtype)
            self._proj_cast = True
        return self._forward(sample, *args, **kwargs)

    def _forward(self, sample: torch.Tensor, *args: object, **kwargs: object) -> object:
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
