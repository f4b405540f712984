"""`difflab-sample`: images from a checkpoint or exported pipeline with any of difflab's samplers.

difflab-sample ckpt=PATH num_images=N out=DIR sampler=NAME steps=S seed=K batch_size=B
difflab-sample -m ckpt=PATH sampler=ddim,unipc steps=10,20     (one subdir of out per combination)
difflab-sample ckpt=PATH guide=step:2000 guidance=2.0           (autoguidance: diffusion/guidance.py)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from difflab.cli import Command, keywords
from difflab.diffusion.guidance import GuidedUNet, guidance_problems, load_guide
from difflab.diffusion.posthoc import EMAStd
from difflab.diffusion.sampling import (
    SamplerName,
    batch_fits,
    build_sampler,
    sample_images,
    sampler_problem,
    steps_problem,
    time_estimate,
)
from difflab.errors import DifflabError
from difflab.files import Readable, atomic_write
from difflab.inference import load_trained_unet, schedule_of
from difflab.precision import ChannelsLast, uses_channels_last
from difflab.rules import AtLeast, Device, Exists, OutputDir, resolve_device

log = logging.getLogger(__name__)

# grid.png shows the first images only: holding every image for it took 4.9 GB for 100,000 at 64 px.
GRID_MAX = 256


# One PNG per image and grid.png; a -m sweep's jobs write to out/<overrides>/ (Hydra's multirun.yaml beside).
IMAGES_DIR = OutputDir(("*.png", "*=*", "multirun.yaml"), "sampled images")


def sample(
    ckpt: Annotated[str, Exists(), Readable()],
    out: Annotated[str, IMAGES_DIR],
    num_images: Annotated[int, AtLeast(1)],
    sampler: SamplerName,
    steps: Annotated[int, AtLeast(1)],
    seed: int,
    batch_size: Annotated[int, AtLeast(1)],
    device: Annotated[str, Device()],
    use_ema: bool,
    ema_std: EMAStd | None,
    channels_last: ChannelsLast,
    grid: bool,
    guide: str | None,
    guidance: Annotated[float, AtLeast(0)],
) -> list[Path]:
    """Write ``num_images`` PNGs (and a grid) to ``out``; returns the image paths (conf/sample.yaml
    documents each setting)."""
    device = resolve_device(device)
    nhwc = uses_channels_last(channels_last, "32-true", torch.device(device).type)
    unet, sched_cfg, _ = load_trained_unet(ckpt, use_ema=use_ema, channels_last=nhwc, ema_std=ema_std)
    if guide is not None:
        unet = GuidedUNet(unet, load_guide(guide, ckpt, use_ema, nhwc), guidance)
    scheduler = build_sampler(sampler, sched_cfg)
    if problem := steps_problem(sampler, sched_cfg, steps):
        raise DifflabError(problem)
    unet.to(device)
    with batch_fits(batch_size, device):
        warn_if_long(unet, scheduler, sched_cfg, steps, num_images, batch_size, device)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    width = len(str(num_images - 1))
    with (
        batch_fits(batch_size, device),
        tqdm(total=num_images, desc=f"{sampler} x{steps}", unit="img") as bar,
    ):
        for idx, batch in sample_images(unet, scheduler, num_images, seed, steps, batch_size, device=device):
            for i, img in zip(idx, batch.cpu(), strict=True):
                path = folder / f"{i:0{width}d}.png"
                # Whole or absent: Ctrl-C or a full disk mid-image leaves no truncated PNG.
                atomic_write(path, lambda f, img=img: save_image(img, f, format="png"), sync=False)
                paths.append(path)
            if grid and sum(map(len, images)) < GRID_MAX:
                images.append(batch[: GRID_MAX - sum(map(len, images))].cpu())
            bar.update(len(idx))
    if grid:
        every = torch.cat(images)
        grid_image = make_grid(every, nrow=max(1, int(len(every) ** 0.5)), padding=2, pad_value=1.0)
        atomic_write(folder / "grid.png", lambda f: save_image(grid_image, f, format="png"), sync=False)
    return paths


def warn_if_long(
    unet: torch.nn.Module,
    scheduler: object,
    sched_cfg: dict,
    steps: int,
    num_images: int,
    batch_size: int,
    device: str,
) -> None:
    """One warning, with a measured time estimate, when ``steps`` exceeds the training schedule's noise
    levels (only the continuous flow samplers get there: steps_problem refuses the others)."""
    levels = int(sched_cfg.get("num_train_timesteps", 1000))
    if steps > levels:
        eta = time_estimate(unet, scheduler, steps, num_images, batch_size, device)
        log.warning(
            "steps=%d is more than the %d noise levels the model was trained on: %s for %d images "
            "(Ctrl-C stops it)",
            steps,
            levels,
            eta,
            num_images,
        )


def sampler_steps_problems(ckpt: str, samplers: list[str], step_counts: list[int]) -> list[str]:
    """Each sampler x steps the checkpoint's noise schedule cannot take, one line each (start-up: for
    every job of a -m sweep, before any job writes)."""
    schedule = schedule_of(ckpt)
    if schedule is None:
        return []
    found = [f"sampler={name}: {why}" for name in samplers if (why := sampler_problem(name, schedule))]
    good = [name for name in samplers if not sampler_problem(name, schedule)]
    return found + [why for name in good for n in step_counts if (why := steps_problem(name, schedule, n))]


def checks(cfg: DictConfig) -> list[str]:
    return sampler_steps_problems(str(cfg.ckpt), [cfg.sampler], [cfg.steps]) + guidance_problems(
        cfg.guide, cfg.guidance, str(cfg.ckpt)
    )


def run(cfg: DictConfig) -> list[Path]:
    kwargs = keywords(sample, cfg)
    paths = sample(**kwargs)
    print(f"wrote {len(paths)} images to {kwargs['out']}")
    return paths


COMMAND = Command("sample", run, sample, checks)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
