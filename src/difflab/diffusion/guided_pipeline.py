"""An autoguided diffusers pipeline (difflab-export guide=... guidance=w): the model, its guide (a weaker
version of it) and the scheduler, sampled as D = guide + w·(model − guide) on the networks' outputs
(diffusion/guidance.py says why that space). difflab-export writes this file beside the export as its
``pipeline.py``: it imports torch and diffusers only, so the folder loads without difflab installed:

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(batch_size=16, num_inference_steps=20).images            # guidance: the exported w

The loop is DDPMPipeline's (noise, then ``step()`` over the scheduler's timesteps) with the guide's
evaluation added, so any diffusers scheduler built from ``pipe.scheduler.config`` can replace the saved one,
as for a plain export. ``guidance`` (the weight exported) may be overridden per call; 1.0 skips the guide.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class GuidedPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->guide"

    def __init__(self, unet, guide, scheduler, guidance: float = 1.0) -> None:
        super().__init__()
        self.register_modules(unet=unet, guide=guide, scheduler=scheduler)
        self.register_to_config(guidance=float(guidance))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 20,
        guidance: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        weight = float(self.config.guidance if guidance is None else guidance)
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale = getattr(self.scheduler, "scale_model_input", lambda x, t: x)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        extra = {"generator": generator} if takes_generator else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = scale(x, t)
            out = self.unet(model_in, t).sample
            if weight != 1.0:
                out = torch.lerp(self.guide(model_in, t).sample, out, weight)
            x = self.scheduler.step(out, t, x, **extra).prev_sample
        image = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
