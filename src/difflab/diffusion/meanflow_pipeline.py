"""A diffusers pipeline for a MeanFlow model (difflab's model=meanflow), written beside an export as its
``pipeline.py``: it imports torch and diffusers only, so the folder loads without difflab installed:

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(batch_size=16, num_inference_steps=1).images

The UNet predicts the average velocity u(z_t, r, t) over [r, t] (timestep t·T, class label (t − r)·T);
``num_inference_steps`` equal jumps z_r = z_t − (t − r)·u go from pure noise (t = 1) to an image (r = 0),
the same arithmetic as ``difflab-sample sampler=meanflow``. The scheduler component only carries T
(``num_train_timesteps``).
"""

from __future__ import annotations

import itertools

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class MeanFlowPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        scale = self.scheduler.config.num_train_timesteps
        edges = (torch.linspace(1.0, 0.0, num_inference_steps + 1) * scale).to(self.device)
        for t, r in self.progress_bar(list(itertools.pairwise(edges))):
            gap = t - r
            u = self.unet(x, t, class_labels=gap.expand(batch_size)).sample
            x = (x.float() - gap / scale * u.float()).to(x.dtype)
        image = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
