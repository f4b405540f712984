"""Image → model tensor: channel conversion, then torchvision v2 Resize / crop / flip / Normalize.

The pipeline is split in three: a deterministic prefix (Resize, CenterCrop) that an in-memory dataset
applies once at set-up; a random part (RandomCrop, horizontal flip) run per sample under a seed
derived from (run seed, epoch, index), so augmentation is reproducible and survives resume; and the
float conversion + Normalize to [-1, 1], done per batch on the device (``normalize_batch``): uint8
crosses the loader and the host-to-device copy, four times fewer bytes than float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# CenterCrop or RandomCrop after resizing the shorter side.
Crop = Literal["center", "random"]


def _composite_alpha(img: Image.Image, background: Sequence[int]) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (*tuple(int(c) for c in background), 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def pil_to_tensor(
    img: Image.Image, channels: int, background: Sequence[int] = (255, 255, 255)
) -> torch.Tensor:
    """Decode a PIL image into CHW with ``channels`` channels.

    8-bit images give uint8; 16/32-bit integer images give float32 in [0, 1] scaled by their own bit
    depth (a 16-bit scan keeps its full range instead of being clipped at 255).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 2**31 - 1
        t = torch.from_numpy(arr / scale).clamp_(0, 1).unsqueeze(0)
        return t.expand(3, -1, -1).contiguous() if channels == 3 else t
    if img.mode == "F":
        t = torch.from_numpy(np.asarray(img, dtype=np.float32)).clamp(0, 1).unsqueeze(0)
        return t.expand(3, -1, -1).contiguous() if channels == 3 else t
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        img = _composite_alpha(img, background)
    img = img.convert("L" if channels == 1 else "RGB")
    return F.pil_to_tensor(img)


def tensor_to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a CHW (or NCHW) image tensor between 1 and 3 channels."""
    c = t.shape[-3]
    if c == channels:
        return t
    if c == 1 and channels == 3:
        return t.expand(*t.shape[:-3], 3, *t.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        return F.rgb_to_grayscale(t, num_output_channels=1)
    if c == 4:  # RGBA tensor: composite on black is ambiguous; refuse rather than guess
        raise ValueError("RGBA tensors must be decoded through pil_to_tensor (alpha compositing)")
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def to_model_input(img: Image.Image | torch.Tensor, channels: int, background: Sequence[int]) -> torch.Tensor:
    """Any raw image (PIL or tensor) → CHW tensor with the wanted channels (uint8 or float in [0, 1])."""
    if isinstance(img, Image.Image):
        return pil_to_tensor(img, channels, background)
    return tensor_to_channels(img, channels)


def flip_decision(seed: int) -> bool:
    """Whether the sample with this augmentation seed is mirrored (probability 1/2)."""
    return bool(torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5)


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images → float32 in [-1, 1] (ToDtype(scale) + Normalize(0.5, 0.5))."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(127.5).sub_(1.0)
    return batch.float() * 2 - 1


class ImageTransform:
    """Resize(shorter side) → CenterCrop|RandomCrop → [horizontal flip]; then ``normalize_batch``."""

    def __init__(self, resolution: int, channels: int, crop: Crop = "center", flip: bool = False) -> None:
        self.resolution, self.flip = resolution, flip
        resize = v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        self.deterministic = v2.Compose([resize, v2.CenterCrop(resolution)] if crop == "center" else [resize])
        self.random_crop = v2.RandomCrop(resolution) if crop == "random" else None

    def augment(self, t: torch.Tensor, seed: int | None) -> torch.Tensor:
        """The random part; ``seed`` makes it reproducible per sample (None: no augmentation)."""
        if seed is None:
            return self.random_crop(t) if self.random_crop is not None else t
        if self.random_crop is not None:
            # torchvision's random transforms draw from the global RNG; fork it so the per-sample
            # seed neither depends on nor disturbs anything else in the process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                t = self.random_crop(t)
        if self.flip and flip_decision(seed):
            t = F.horizontal_flip(t)
        return t
