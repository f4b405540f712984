"""Images/s, FLOP/s and MFU, global batch and images seen, measured on the host clock with no device sync."""

from __future__ import annotations

import time
from typing import Annotated

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops

from difflab.cadence import due
from difflab.rules import AtLeast


class ThroughputCallback(L.Callback):
    """Logs ``perf/images_per_sec`` (mean over each logging window), ``perf/tflops`` and ``perf/mfu``,
    ``perf/global_batch``, ``train/kimg``.

    The FLOPs of one training image (forward + backward) are counted once by Lightning's
    ``measure_flops`` on a meta-device copy of the UNet, and the device's peak comes from Lightning's
    own table (``get_available_flops``: CUDA and TPU chips; none for CPUs, so no ``perf/mfu`` there).
    Lightning's ThroughputMonitor itself is not used: it synchronises the device every step, and a
    wall-clock rate over a window of N steps needs no sync (the queue of launched kernels is bounded).
    """

    def __init__(self, every_n_steps: Annotated[int, AtLeast(1)] | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0
        self._rate: float | None = None
        self._seen_step = -1
        self._flops_per_image: int | None = None
        self._peak: int | None = None  # the device's peak FLOP/s at the training precision, if known

    @staticmethod
    def flops_per_image(unet: torch.nn.Module) -> int:
        """Forward + backward FLOPs of one training image through ``unet`` (counted on the meta device:
        no memory, no compute, ~0.3 s for the ``small`` UNet)."""
        cfg = unet.config
        with torch.device("meta"):
            copy = type(unet).from_config(cfg)
            x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            t = torch.zeros(1, dtype=torch.long)
        # MeanFlow's second time input (class_labels); its JVP's tangent pass is not counted.
        more = {"class_labels": t} if getattr(cfg, "class_embed_type", None) else {}
        return measure_flops(copy, lambda: copy(x, t, **more).sample, lambda y: y.sum())

    @staticmethod
    def global_batch(trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        per_device = getattr(dm, "batch_size", 0)
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        unet = getattr(pl_module, "unet", None)
        if unet is not None and self._flops_per_image is None:
            self._flops_per_image = self.flops_per_image(unet)
            precision = str(trainer.precision)
            dtype = (
                torch.bfloat16
                if "bf16" in precision
                else torch.float16
                if "16" in precision
                else torch.float32
            )
            self._peak = get_available_flops(pl_module.device, dtype)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step, gb = trainer.global_step, self.global_batch(trainer)
        if step == self._seen_step:
            return  # a micro-batch that did not step (gradient accumulation)
        self._seen_step = step
        every = self.every_n_steps or trainer.log_every_n_steps
        if self._t0 is not None and step - self._step0 >= every:
            now = time.perf_counter()
            self._rate = gb * (step - self._step0) / (now - self._t0)
            self._t0, self._step0 = now, step
        log_every = trainer.log_every_n_steps
        if not (due(step, log_every) or (log_every and trainer.should_stop)):
            return  # Lightning hands metrics to loggers only every log_every_n_steps: skip the Python cost
        values = {"perf/global_batch": float(gb), "train/kimg": step * gb / 1000}
        if self._rate is not None:
            values["perf/images_per_sec"] = self._rate
            if self._flops_per_image:
                flops = self._rate * self._flops_per_image
                values["perf/tflops"] = flops / 1e12
                if self._peak:
                    values["perf/mfu"] = flops / (self._peak * trainer.world_size)
        pl_module.log_dict(values, rank_zero_only=True)
