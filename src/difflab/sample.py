"""`difflab-sample`: images from a checkpoint or exported pipeline with any of difflab's samplers.

difflab-sample ckpt=PATH num_images=N out=DIR sampler=NAME steps=S seed=K batch_size=B
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from difflab.checkpoints import load_trained_unet
from difflab.config import resolve_device, run_command
from difflab.diffusion.sampling import build_sampler, sample_images
from difflab.errors import DifflabError


def sample(cfg: DictConfig) -> list[Path]:
    """Write ``cfg.num_images`` PNGs (and a grid) to ``cfg.out``; returns the image paths."""
    if cfg.num_images < 1:
        raise DifflabError(f"num_images={cfg.num_images} must be at least 1")
    device = resolve_device(cfg.device)
    unet, sched_cfg, _ = load_trained_unet(cfg.ckpt, use_ema=cfg.use_ema, channels_last=cfg.channels_last)
    unet.to(device)
    sampler = build_sampler(cfg.sampler, sched_cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    width = len(str(cfg.num_images - 1))
    with tqdm(total=cfg.num_images, desc=f"{cfg.sampler} x{cfg.steps}", unit="img") as bar:
        for idx, batch in sample_images(
            unet, sampler, cfg.num_images, cfg.seed, cfg.steps, cfg.batch_size, device=device
        ):
            for i, img in zip(idx, batch.cpu(), strict=True):
                path = out / f"{i:0{width}d}.png"
                save_image(img, path)
                paths.append(path)
            if cfg.grid:
                images.append(batch.cpu())
            bar.update(len(idx))
    if cfg.grid:
        grid = torch.cat(images)
        save_image(
            make_grid(grid, nrow=max(1, int(len(grid) ** 0.5)), padding=2, pad_value=1.0), out / "grid.png"
        )
    return paths


def main(argv: list[str] | None = None) -> None:
    run_command("sample", lambda cfg: f"wrote {len(sample(cfg))} images to {cfg.out}", argv)


if __name__ == "__main__":
    main()
