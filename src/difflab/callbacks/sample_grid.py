"""Every N steps (and at the end) sample a fixed-seed grid with the EMA weights and save/log it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

from difflab.cadence import due
from difflab.diffusion.sampling import SamplerName, build_sampler, sample_images
from difflab.rules import AtLeast

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Writes ``<dirpath>/step_XXXXXXX.png`` and sends the grid to loggers that take images.

    Runs on rank 0 only: a few-step sampler over a handful of images takes seconds, and the other
    ranks simply wait for it at their next gradient all-reduce instead of at an explicit barrier.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: Annotated[int, AtLeast(0)] = 500,
        num_images: Annotated[int, AtLeast(1)] = 64,
        sampler: SamplerName = "dpmsolver++",
        steps: Annotated[int, AtLeast(1)] = 20,
        seed: int = 0,
        nrow: Annotated[int, AtLeast(1)] | None = None,
        batch_size: Annotated[int, AtLeast(1)] = 64,
        on_train_end: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.sampler_name, self.steps, self.seed = sampler, steps, seed
        self.nrow = nrow or max(1, int(num_images**0.5))
        self.batch_size, self.at_end = batch_size, on_train_end
        self.last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if due(step, self.every_n_steps) and step != self.last_step:
            self.write_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self.last_step:
            self.write_grid(trainer, pl_module)

    def write_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        self.last_step = step
        if not trainer.is_global_zero:
            return None
        sampler = build_sampler(self.sampler_name, dict(pl_module.noise_scheduler.config))
        with pl_module.sampling_unet() as unet:
            batches = sample_images(unet, sampler, self.num_images, self.seed, self.steps, self.batch_size)
            images = torch.cat([img for _, img in batches])
        grid = make_grid(images, nrow=self.nrow, padding=2, pad_value=1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{step:07d}.png"
        save_image(grid, path)
        log.info("sample grid: %s", path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, global_step=step)
        return path
