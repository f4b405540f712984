"""Paper recipes in experiments/: each composes as documented and trains one step on stand-in data."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from difflab.checkpoints import load_checkpoint
from difflab.train import train
from tests.conftest import compose_config

ONE_STEP = (
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "data.batch_size=2",
    "data.num_workers=0",
)


def test_ddpm_cifar10_recipe(tmp_path, monkeypatch):
    """Ho et al.'s settings, on 4 random 32 px images standing in for CIFAR-10's files."""
    from difflab.data import sources

    fake = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4)
    monkeypatch.setattr(sources, "_torchvision_images", lambda name, root, train: fake)
    run = tmp_path / "run"
    cfg = compose_config(run, ["experiment=ddpm_cifar10", *ONE_STEP])
    assert (
        cfg.model.optimizer.lr == 2e-4
        and cfg.model.warmup_steps == 5000
        and cfg.model.lr_schedule == "constant"
    )
    assert cfg.model.unet.dropout == 0.1 and cfg.trainer.max_steps == 1 and cfg.model.ema.min_decay == 0.9999
    train(cfg)
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1
    assert sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("unet.")) == pytest.approx(
        35.7e6, rel=0.01
    )
    assert ckpt["ema"]["decay"] == 0.9999  # constant from the first step


@pytest.mark.slow  # 35-60 s: a 113.7M UNet, a 1.8 GB checkpoint (test_configs composes it by default)
def test_diffusers_flowers64_recipe(tmp_path):
    """The diffusers example's run, on 4 random 64 px images saved as a local datasets folder in
    place of huggan/flowers-102-categories."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)) for _ in range(4)]
    local = tmp_path / "flowers"
    datasets.Dataset.from_dict({"image": pictures}).cast_column("image", datasets.Image()).save_to_disk(
        str(local)
    )
    run = tmp_path / "run"
    # 32 px instead of 64 (the UNet's 5 downsamplings allow it): the same network, a quarter of the time.
    cfg = compose_config(
        run, ["experiment=diffusers_flowers64", f"data.source.name={local}", "data.resolution=32", *ONE_STEP]
    )
    opt = cfg.model.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (1e-4, (0.95, 0.999), 1e-6)
    assert cfg.model.warmup_steps == 500 and cfg.trainer.gradient_clip_val == 1.0
    train(cfg)
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1
    assert sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("unet.")) == pytest.approx(
        113.7e6, rel=0.01
    )


def test_torchvision_sources_read_the_standard_files_offline_from_root(tmp_path):
    """data=mnist/cifar10 read torchvision's standard files from data.source.root with no network:
    here Fashion-MNIST's IDX files (Debian's copy, gunzipped), through the same torchvision path."""
    import gzip

    from difflab.data.sources import fashion_mnist_source, torchvision_source
    from difflab.errors import DifflabError

    debian = Path("/usr/share/datasets/fashion-mnist")  # where data=fashion_mnist reads them
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in debian.glob("*-ubyte.gz"):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    test = torchvision_source("fashion_mnist", str(tmp_path), split="test")
    assert len(test) == 10_000 and torch.equal(test.images, fashion_mnist_source(split="test").images)
    with pytest.raises(
        DifflabError, match=r"mnist is not in data.source.root=.* put the 4 IDX files .*MNIST/raw"
    ):
        torchvision_source("mnist", str(tmp_path / "empty"))
