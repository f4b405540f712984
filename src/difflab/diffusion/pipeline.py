"""The diffusers pipeline of every difflab export that DDPMPipeline cannot run: a MeanFlow model, and an
autoguided model of any objective (both UNets). difflab-export writes this file beside such an export as
its ``pipeline.py``: it imports torch and diffusers only, so the folder loads without difflab installed,
and draws with difflab-sample's own code:

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(batch_size=16, num_inference_steps=1).images

One class for both (``DifflabPipeline``): diffusers loads every folder's ``pipeline.py`` into the same
module, where a second pipeline class left by an earlier load in the process would make it refuse the
next folder.

MeanFlow (``meanflow`` true in model_index.json): the UNet predicts the average velocity
u(z_t, r, t) over [r, t] (timestep t·T, class label (t − r)·T); ``num_inference_steps`` equal jumps
z_r = z_t − (t − r)·u go from pure noise (t = 1) to an image (r = 0), ``MeanFlowScheduler`` below, as
``difflab-sample sampler=meanflow``. The pipeline's scheduler component (diffusers' flow scheduler, so
diffusers loads it without custom code) only carries T.

Other objectives: DDPMPipeline's loop (noise, then ``step()`` over the scheduler's timesteps), so any
diffusers scheduler built from ``pipe.scheduler.config`` can replace the saved one.

Autoguidance (a ``guide`` component, difflab's diffusion/guidance.py): each network output is
guide + w·(model − guide), ``guidance`` = w (the weight exported, overridable per call; 1.0 skips the
guide).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class MeanFlowScheduler(SchedulerMixin, ConfigMixin):
    """The MeanFlow schedule (``model.noise_scheduler`` under model=meanflow) and its sampler
    (``sampler=meanflow``): ``steps`` equal jumps z_r = z_t − (t−r)·u from t = 1 (pure noise) to 0.

    The training settings live in the config too, so a checkpoint records them: ``ratio`` (the share of
    samples with r ≠ t, round(ratio·batch) of each batch; the rest are flow-matching samples at r = t),
    and the adaptive loss weight w = 1/(‖Δ‖² + c)^p (``adaptive_p``, ``adaptive_c``). ``objective``
    marks the config as MeanFlow's (difflab reads it)."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        ratio: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        objective: str = "meanflow",
    ) -> None:
        self.timesteps = torch.tensor([float(num_train_timesteps)])
        self.init_noise_sigma = 1.0
        self._ends: torch.Tensor = torch.tensor([0.0])
        self._index = 0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Jumps between t = 1 − i/steps and r = 1 − (i+1)/steps, as network timesteps (t·T)."""
        edges = torch.linspace(1.0, 0.0, num_inference_steps + 1) * self.config.num_train_timesteps
        self.timesteps, self._ends = edges[:-1].to(device), edges[1:].to(device)
        self._index = 0

    def _gap(self) -> torch.Tensor:
        """(t − r)·T of the current jump."""
        return self.timesteps[self._index] - self._ends[self._index]

    def model_inputs(self, timestep: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        """What the network takes beside (z_t, t): (t − r)·T as its class-embedding input."""
        return {"class_labels": self._gap().expand(batch)}

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """z_r = z_t − (t − r)·u, with u = ``model_output``."""
        gap = self._gap() / self.config.num_train_timesteps
        prev = (sample.float() - gap * model_output.float()).to(sample.dtype)
        self._index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DifflabPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->guide"
    _optional_components = ["guide"]

    def __init__(self, unet, scheduler, guide=None, guidance: float = 1.0, meanflow: bool = False) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, guide=guide)
        self.register_to_config(guidance=float(guidance), meanflow=bool(meanflow))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """``num_inference_steps``: default 1 for a MeanFlow model, 20 for the others."""
        weight = float(self.config.guidance if guidance is None else guidance)
        if weight != 1.0 and self.guide is None:
            raise ValueError(f"guidance={weight} needs a guide: this pipeline was exported without one")
        meanflow = self.config.meanflow
        steps = num_inference_steps or (1 if meanflow else 20)
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if meanflow:
            sampler = MeanFlowScheduler(num_train_timesteps=self.scheduler.config.num_train_timesteps)
            sampler.set_timesteps(steps, device=self.device)
            extra, scale = {}, lambda x, t: x
        else:
            sampler = self.scheduler
            sampler.set_timesteps(steps, device=self.device)
            x = x * getattr(sampler, "init_noise_sigma", 1.0)
            scale = getattr(sampler, "scale_model_input", lambda x, t: x)
            takes_generator = "generator" in inspect.signature(sampler.step).parameters
            extra = {"generator": generator} if takes_generator else {}
        for t in self.progress_bar(sampler.timesteps):
            model_in = scale(x, t)
            inputs = sampler.model_inputs(t, batch_size) if meanflow else {}
            out = self.unet(model_in, t, **inputs).sample
            if weight != 1.0:
                out = torch.lerp(self.guide(model_in, t, **inputs).sample, out, weight)
            x = sampler.step(out, t, x, **extra).prev_sample
        image = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
