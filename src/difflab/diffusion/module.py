"""The LightningModule: UNet + noise process + EMA, trained with AdamW and a warm-up LR schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler

from difflab.diffusion.ema import build_ema, swapped_in
from difflab.diffusion.noise import NoiseProcess
from difflab.errors import DifflabError

LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
CHECKPOINT_FORMAT_VERSION = 1


class DiffusionModule(L.LightningModule):
    """Trains ``unet`` to denoise under ``noise_scheduler``; keeps an EMA copy of its weights."""

    def __init__(
        self,
        unet: UNet2DModel,
        noise_scheduler: DDPMScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: str = "cosine",
        warmup_steps: int = 100,
        min_snr_gamma: float | None = None,
        ema: dict | None = None,
        seed: int | None = 0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise DifflabError(
                f"model.lr_schedule={lr_schedule!r} is not valid; allowed: {', '.join(LR_SCHEDULES)}"
            )
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.process = NoiseProcess(noise_scheduler, min_snr_gamma)
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        ema = dict(ema or {})
        self.ema = (
            build_ema(unet, **{k: v for k, v in ema.items() if k != "enabled"})
            if ema.get("enabled", True)
            else None
        )
        # The base seed of the per-step noise; random when unset, and saved so a resume stays exact.
        self.noise_seed = int(seed) if seed is not None else int(torch.randint(0, 2**31, ()).item())
        self.channels_last = channels_last
        self.run_config: dict = {}  # the resolved run config, stored in checkpoints (set by train)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()  # in place: state_dict keys stay the same as the eager model's
        # Loss per timestep quartile, accumulated on the device between log points (no host sync).
        self.register_buffer("_q_sum", torch.zeros(4), persistent=False)
        self.register_buffer("_q_count", torch.zeros(4), persistent=False)

    # ----------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def _step_generator(self, batch_idx: int) -> torch.Generator:
        # Noise and timesteps are a pure function of (seed, epoch, batch, rank): they differ per rank
        # and a resumed run redraws exactly what an uninterrupted one would, with no RNG state to save.
        key = hash((self.noise_seed, self.current_epoch, batch_idx, self.global_rank)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(self.device).manual_seed(key)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x0 = batch
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        g = self._step_generator(batch_idx)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.process.num_timesteps, (x0.shape[0],), generator=g, device=x0.device)
        xt = self.process.add_noise(x0, noise, t)
        pred = self.unet(xt, t).sample
        target = self.process.target(x0, noise, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * self.process.loss_weights(t)).mean()

        q = (t * 4 // self.process.num_timesteps).clamp(max=3)
        self._q_sum.index_add_(0, q, per_sample.detach().float())
        self._q_count.index_add_(0, q, torch.ones_like(per_sample, dtype=torch.float32))
        self.log("train/loss", loss, prog_bar=True)
        if self._is_log_step():
            # Quartile means over the whole logging window; each self.log costs ~0.1 ms of Python,
            # so the extras are only logged on the steps where Lightning hands metrics to loggers.
            means = self._q_sum / self._q_count.clamp(min=1)
            self.log_dict({f"train/loss_q{i}": means[i] for i in range(4)})
            self._q_sum.zero_()
            self._q_count.zero_()
            if self.ema is not None:
                self.log("train/ema_decay", float(self.ema.cur_decay_value or 0.0))
        return loss

    def _is_log_step(self) -> bool:
        """True on the steps whose metrics Lightning passes to the loggers (log_every_n_steps)."""
        return self._trainer is None or self.trainer._logger_connector.should_update_logs

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # One EMA update per real optimizer step (not per micro-batch under gradient accumulation).
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(params=self.unet.parameters())
        # estimated_stepping_batches counts real optimizer steps: max_steps, or epochs x batches
        # divided by accumulation and sharded over devices, which is what the schedule must span.
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            LR_SCHEDULES[self.lr_schedule],
            optimizer,
            num_warmup_steps=self.warmup_steps,
            num_training_steps=max(total, 1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["difflab"] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "unet_config": dict(self.unet.config),
            "scheduler_config": dict(self.noise_scheduler.config),
            "noise_seed": self.noise_seed,
            "config": self.run_config,
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("difflab", {})
        self.noise_seed = meta.get("noise_seed", self.noise_seed)
        if self.ema is not None and "ema" in checkpoint:
            state = checkpoint["ema"]
            self.ema.load_state_dict(state)
            self.ema.to(self.device)

    # ----------------------------------------------------------------------------------- sampling
    def ema_unet(self) -> Any:
        """Context manager: the UNet with EMA weights swapped in (live weights restored after)."""
        return swapped_in(self.ema, self.unet)
