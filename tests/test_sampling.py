"""diffusion/sampling.py: every sampler reproducible per image, independent of batch size. (The sample
command: test_sample.py; export: test_export.py.)"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from difflab.diffusion.sampling import SAMPLERS, build_sampler, image_generators, sample_images
from difflab.errors import DifflabError


def tiny_unet(seed: int = 0, **settings: object) -> UNet2DModel:
    """An 8 px grey UNet of 2 levels, in eval mode; ``settings`` override UNet2DModel's."""
    torch.manual_seed(seed)
    base = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (16, 32),
            "layers_per_block": 1, "down_block_types": ("DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D"), "norm_num_groups": 8}  # fmt: skip
    return UNet2DModel(**{**base, **settings}).eval()


def images(unet, name, n=6, seed=0, steps=4, batch_size=6):
    sampler = build_sampler(name, dict(DDPMScheduler().config))
    return torch.cat([x for _, x in sample_images(unet, sampler, n, seed, steps, batch_size)])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_a", "heun"])
def test_same_seed_same_images_across_batch_sizes(name):
    unet = tiny_unet()
    a, b = images(unet, name, batch_size=6), images(unet, name, batch_size=4)
    assert a.shape == (6, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()  # float noise of batch-size kernels only
    c = images(unet, name, seed=1)
    assert (a - c).abs().mean() > 1e-2  # another seed, other images


def test_image_i_depends_only_on_seed_and_index():
    unet = tiny_unet()
    all6 = images(unet, "ddpm", n=6)
    sampler = build_sampler("ddpm", dict(DDPMScheduler().config))
    last3 = torch.cat([x for _, x in sample_images(unet, sampler, 3, 0, 4, 2, start=3)])
    assert torch.allclose(all6[3:], last3, atol=1e-5)
    assert len({g.initial_seed() for g in image_generators(0, range(100))}) == 100


def test_unknown_sampler_is_clear():
    with pytest.raises(DifflabError, match=r"unknown sampler 'fast'; allowed: ddpm, ddim, dpmsolver\+\+"):
        build_sampler("fast", dict(DDPMScheduler().config))
    assert {"ddpm", "ddim", "dpmsolver++", "unipc", "euler", "heun"} <= set(SAMPLERS)
