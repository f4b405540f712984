"""Sampling, export and the sample command: reproducible per image, independent of batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from PIL import Image

from difflab.diffusion.sampling import SAMPLERS, build_sampler, image_generators, sample_images
from difflab.errors import DifflabError
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


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


@pytest.fixture(scope="module")
def trained_ckpt(trained_runs):
    from tests.conftest import FLOW_30

    return trained_runs(*FLOW_30) / "checkpoints" / "last.ckpt"


def sample(**kw) -> list:
    """`difflab-sample k=v ...`, in this process."""
    return SAMPLE.call([f"{k}={v}" for k, v in kw.items()])


def test_sample_command_writes_pngs_and_grid_batch_independent(trained_ckpt, tmp_path):
    paths = sample(ckpt=trained_ckpt, num_images=5, out=tmp_path / "a", batch_size=5, steps=5)
    sample(ckpt=trained_ckpt, num_images=5, out=tmp_path / "b", batch_size=2, steps=5)
    assert [p.name for p in paths] == [f"{i}.png" for i in range(5)]
    assert (tmp_path / "a" / "grid.png").is_file()
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / f"{i}.png")).astype(int)
        assert a.shape == (8, 8, 3) and np.abs(a - b).max() <= 1
    # channels_last (the default) is a speed setting only: NCHW weights give the same images.
    sample(ckpt=trained_ckpt, num_images=5, out=tmp_path / "c", steps=5, channels_last="false")
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i}.png")).astype(int)
        c = np.asarray(Image.open(tmp_path / "c" / f"{i}.png")).astype(int)
        assert np.abs(a - c).max() <= 1


def test_sample_command_bad_input(trained_ckpt, tmp_path):
    with pytest.raises(DifflabError, match="num_images=0 must be at least 1"):
        sample(ckpt=trained_ckpt, num_images=0, out=tmp_path)
    with pytest.raises(DifflabError, match="sampler=lms2 is not valid; allowed: ddpm"):
        sample(ckpt=trained_ckpt, sampler="lms2", out=tmp_path)
    with pytest.raises(DifflabError, match=r"missing\.ckpt does not exist"):
        sample(ckpt=tmp_path / "missing.ckpt", out=tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(
        DifflabError, match="is not a difflab checkpoint: it is not a PyTorch checkpoint file"
    ):
        sample(ckpt=junk, out=tmp_path / "s")  # not tmp_path itself: it holds junk.ckpt, refused as out
    with pytest.raises(DifflabError, match="unknown key num_imgs; did you mean num_images"):
        sample(ckpt=trained_ckpt, num_imgs=3)
    with pytest.raises(DifflabError, match=r"ckpt is required \(give ckpt=...\)"):
        sample()


def test_export_round_trip_matches_difflab_sample(trained_ckpt, tmp_path):
    out = EXPORT.call([f"ckpt={trained_ckpt}", f"out={tmp_path / 'pipe'}"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.ckpt"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]  # diffusers' own class, not difflab's subclass
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.scheduler = build_sampler("dpmsolver++", pipe.scheduler.config)  # what difflab-sample uses
    gens = image_generators(7, range(4))
    ref = pipe(batch_size=4, generator=gens, num_inference_steps=10, output_type="np").images  # (4, 8, 8, 1)
    ours = sample(ckpt=trained_ckpt, num_images=4, seed=7, steps=10, out=tmp_path / "s", grid="false")
    for i, p in enumerate(ours):
        mine = np.asarray(Image.open(p))[..., 0].astype(float)
        theirs = np.round(ref[i, ..., 0] * 255)
        assert np.abs(mine - theirs).max() <= 1.0
    # Sampling the export through difflab-sample gives the same images as from the checkpoint.
    again = sample(ckpt=out, num_images=4, seed=7, steps=10, out=tmp_path / "e", grid="false")
    for p, q in zip(ours, again, strict=True):
        assert (
            np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(q)).astype(int)).max() <= 1
        )
