"""Sampling with any diffusers scheduler; image i depends only on (seed, i), never on the batch size.

Each image gets its own ``torch.Generator`` seeded by (seed, i); diffusers' ``randn_tensor`` draws
per-sample noise from a list of generators, both for the initial noise and for stochastic steps,
exactly as ``DDPMPipeline`` does, so an exported pipeline reproduces these images.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from difflab.errors import DifflabError

# name → (diffusers class, extra config). All are built from the training DDPMScheduler's config, so
# the beta schedule, prediction type and timestep count always match what the network learned.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # First-order-style DPM-Solver cannot end at sigma 0 (diffusers refuses "zero" for it).
    "dpmsolver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"},
    ),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def build_sampler(name: str, train_scheduler_config: dict, **overrides: object) -> diffusers.SchedulerMixin:
    """A diffusers scheduler named ``name`` configured like the training noise schedule."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown scheduler {name!r}; allowed: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    # Private keys go: diffusers drops the `_use_default_values` keys from a config, so a checkpoint's
    # config and the same config re-read from an exported pipeline would give different samplers.
    config = {k: v for k, v in dict(train_scheduler_config).items() if not k.startswith("_")}
    # Few-step sampling must start at the last training timestep (pure noise): "trailing" spacing
    # does; DDPM's default "leading" starts 10% early at 10 steps (Lin et al. 2023, table 2).
    config["timestep_spacing"] = "trailing"
    # The exact betas the network was trained with (DDPMScheduler computes every beta_schedule; most
    # samplers lack "sigmoid"). Zero-terminal-SNR rescaling, if set, is idempotent on these.
    config["trained_betas"] = diffusers.DDPMScheduler.from_config(config).betas.tolist()
    params = inspect.signature(cls.__init__).parameters
    if config.get("clip_sample", False) and "clip_sample" not in params and "thresholding" in params:
        # Multistep solvers cannot clip x0 like DDPM/DDIM; without it, few-step samples of a pixel-space
        # model saturate into noise blobs. Dynamic thresholding (Imagen) is their equivalent.
        extra = {"thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0), **extra}
    return cls.from_config(config, **{**extra, **overrides})


def image_generators(seed: int, indices: range, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image; image i's stream is seeded by (seed, i) alone."""
    return [torch.Generator(device).manual_seed(hash((seed, i)) & 0x7FFF_FFFF_FFFF_FFFF) for i in indices]


def _accepts(fn: object, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.inference_mode()
def sample_batch(
    unet: torch.nn.Module,
    scheduler: diffusers.SchedulerMixin,
    indices: range,
    seed: int,
    steps: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images ``indices`` of the (seed)-stream, as float in [0, 1], shape (len(indices), C, H, W)."""
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    cfg = unet.config
    shape = (len(indices), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    gens = image_generators(seed, indices, "cpu" if device.type != "cuda" else device)
    x = randn_tensor(shape, generator=gens, device=device, dtype=dtype)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    step_kwargs = {"generator": gens} if _accepts(scheduler.step, "generator") else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = unet(model_in, t).sample
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def sample_images(
    unet: torch.nn.Module,
    scheduler: diffusers.SchedulerMixin,
    num_images: int,
    seed: int,
    steps: int,
    batch_size: int = 64,
    start: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield (indices, images) for images start..start+num_images-1 in batches of ``batch_size``."""
    if num_images < 1:
        raise DifflabError(f"num_images={num_images} must be at least 1")
    if steps < 1:
        raise DifflabError(f"steps={steps} must be at least 1")
    for lo in range(start, start + num_images, batch_size):
        idx = range(lo, min(lo + batch_size, start + num_images))
        yield idx, sample_batch(unet, scheduler, idx, seed, steps, device)
