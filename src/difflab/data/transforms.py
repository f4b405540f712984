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
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# CenterCrop or RandomCrop after resizing the shorter side.
Crop = Literal["center", "random"]


def _composite_alpha(img: Image.Image, background: Sequence[int]) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (*tuple(int(c) for c in background), 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image scaled to 8-bit "L" (PIL's own conversion clips at 255).

    PIL reads 16-bit RGB(A) PNGs as 8-bit already (their high byte), so only the single-channel
    integer and float modes need scaling here; every depth then reaches [-1, 1] through one rule.
    """
    arr = np.asarray(img)
    if img.mode == "F":  # float images are taken to be in [0, 1]
        scaled = arr.astype(np.float64) * 255.0
    elif img.mode.startswith("I;16") or arr.max(initial=0) <= 65535:  # 16-bit (also read as "I")
        scaled = arr.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    else:  # a genuinely 32-bit integer image
        scaled = arr.astype(np.float64) * (255.0 / (2**31 - 1))
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def pil_to_tensor(
    img: Image.Image, channels: int, background: Sequence[int] = (255, 255, 255)
) -> torch.Tensor:
    """Decode a PIL image into a uint8 CHW tensor with ``channels`` channels: the one rule every path
    that reads image files uses (folder and Hugging Face sources, ``difflab-prepare``, FID references).

    EXIF orientation applied (a phone photo stored sideways trains upright); 16-bit, 32-bit and
    float images scaled to 8 bits, so every bit depth maps to the same [-1, 1] range; transparent
    images composited on ``background``; then converted to grey or RGB.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_eight_bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        img = _composite_alpha(img, background)
    img = img.convert("L" if channels == 1 else "RGB")
    return F.pil_to_tensor(img)


# Modes whose conversion in pil_to_tensor is PIL's own, known to work: checking a file of one of these
# modes needs only its EXIF parsed, not a full conversion (2.3x the time of the decode itself).
_ROUTINE_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "F"}
)


def check_decodes(img: Image.Image) -> None:
    """Raise whatever ``pil_to_tensor`` would raise on a loaded image, as cheaply as possible."""
    img.getexif().get(ExifTags.Base.Orientation)
    if img.mode not in _ROUTINE_MODES:
        pil_to_tensor(img, 3)


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
    """Any raw image (PIL or uint8 tensor) → uint8 CHW tensor with the wanted channels."""
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
