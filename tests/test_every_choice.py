"""Every config that validates, runs: each choice of each config group and each allowed value of the
enumerated keys is composed, validated, instantiated and trained for one step that ends in a sample
grid. A choice this machine cannot run (no GPU, no network, no Inception weights) must be refused at
start-up with one line instead; nothing may pass validation and then crash."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import pytest
from PIL import Image

from difflab.config import CONF_DIR
from difflab.data.transforms import Crop
from difflab.diffusion.module import LRSchedule
from difflab.diffusion.noise import BetaSchedule, PredictionType
from difflab.diffusion.sampling import FLOW_SAMPLERS, SamplerName
from difflab.errors import DifflabError
from difflab.precision import ChannelsLast
from difflab.train import COMMAND, train
from tests.conftest import FAST

validate = COMMAND.check


def allowed(hint: object) -> list:
    """Every value a Literal type (or a union holding Literals and bool) allows: read from the same
    type the constructor declares, so a new allowed value is tested without touching this file."""
    out = []
    for arm in get_args(hint) if get_origin(hint) is not Literal else [hint]:
        out += list(get_args(arm)) if get_origin(arm) is Literal else [True, False] if arm is bool else []
    return out


PREDICTION_TYPES = allowed(PredictionType)
SAMPLERS = allowed(SamplerName)

CONF = Path(CONF_DIR)
# One optimizer step, a 4-image 2-step grid at the end, the tiny UNet on digits unless a case says.
ONE_STEP = (
    *FAST,
    "trainer.max_steps=1",
    "data.batch_size=4",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.steps=2",
    "callbacks.sample_grid.batch_size=4",
)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "default")


def _folder(tmp: Path) -> str:
    (tmp / "imgs").mkdir(exist_ok=True)
    for i in range(6):
        Image.fromarray(np.full((10, 12, 3), 30 * i, dtype=np.uint8)).save(tmp / "imgs" / f"{i}.png")
    return str(tmp / "imgs")


def _hf(tmp: Path) -> str:
    import datasets

    imgs = [Image.fromarray(np.full((10, 12, 3), 30 * i, dtype=np.uint8)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": imgs}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp / "hf"))
    return str(tmp / "hf")


def _shards(tmp: Path) -> str:
    from difflab.prepare import COMMAND

    COMMAND.call(
        ["data=folder", f"data.source.path={_folder(tmp)}", f"out={tmp / 'shards'}", "num_workers=1"]
    )
    return str(tmp / "shards")


# Per group choice: extra overrides to make it runnable here, or the start-up error it must give.
NEEDS = {
    "data/folder": lambda tmp: [
        f"data.source.path={_folder(tmp)}",
        "data.resolution=8",
        "data.num_workers=0",
    ],
    "data/hf": lambda tmp: [f"data.source.name={_hf(tmp)}", "data.resolution=8", "data.num_workers=0"],
    "data/streaming": lambda tmp: [
        f"data.source.path={_shards(tmp)}",
        "data.channels=3",
        "data.resolution=8",
        "data.batch_size=4",
        "data.num_workers=0",
    ],
    "data/fashion_mnist": lambda tmp: ["data.source.max_items=64", "data.resolution=8"],
    "data/twemoji": lambda tmp: ["data.source.max_items=64", "data.resolution=8"],
    "data/mnist": lambda tmp: ["data.resolution=8"],
    "data/cifar10": lambda tmp: ["data.resolution=8"],
    "model/unet/small": lambda tmp: ["data.resolution=8"],
    "model/unet/ddpm_cifar10": lambda tmp: ["data.resolution=8"],
    "model/unet/diffusers_64": lambda tmp: ["data.resolution=32", "data.batch_size=2"],
    "callbacks/with_fid": lambda tmp: [
        "callbacks.fid.num_samples=8",
        "callbacks.fid.num_real=64",
        "callbacks.fid.steps=2",
        "callbacks.fid.batch_size=8",
        "callbacks.progress_bar=null",
        "callbacks.sample_grid.num_images=4",
        "callbacks.sample_grid.steps=2",
    ],
    "metrics/inception": lambda tmp: [
        "callbacks=with_fid",
        "metrics.extractor.weights_path=" + str(tmp / "none.pth"),
    ],
    "logger/wandb": lambda tmp: ["logger.wandb.offline=true"],
}
REFUSED_HERE = {  # choice -> the one-line start-up error it gives on this GPU-less, offline machine
    # In-process: Lightning's ddp launcher reruns the command line (tests/test_launchers.py runs it for real).
    "trainer/ddp_cpu": "starts each further rank by running the command line again",
    "trainer/gpu": "no CUDA GPU is visible",
    "trainer/ddp": "no CUDA GPU is visible",
    "trainer/multinode": "no CUDA GPU is visible",
    "data/mnist": "could not be downloaded",
    "data/cifar10": "could not be downloaded",
    "metrics/inception": "metrics.extractor.weights_path=.*none.pth does not exist",
}
# 113.7M parameters: ~15 s a step; 2 spawned ranks: 12 s (test_distributed.py runs ddp_spawn_cpu)
SLOW = {"model/unet/diffusers_64", "trainer/ddp_spawn_cpu"}

GROUPS = [
    "data",
    "model/unet",
    "model/ema",
    "model/guide",
    "trainer",
    "logger",
    "callbacks",
    "metrics",
    "debug",
]
CASES = [
    pytest.param(f"{g}/{c}", marks=pytest.mark.slow) if f"{g}/{c}" in SLOW else f"{g}/{c}"
    for g in GROUPS
    for c in choices(g)
]


def _base(case: str) -> list[str]:
    """ONE_STEP, less what would override the choice under test."""
    group = case.rsplit("/", 1)[0]
    drop = set()
    if group == "data":
        drop.add("experiment=digits")  # the experiment's data choice would win over data=NAME
    if group == "trainer":
        drop |= {"trainer.accelerator=cpu", "trainer.devices=1"}
    if case == "callbacks/none":
        drop |= {a for a in ONE_STEP if a.startswith("callbacks.")}
    base = [a for a in ONE_STEP if a not in drop]
    if group == "data":
        base += ["model/unet=tiny", "data.channels=1", "data.batch_size=4"]
    return base


def _run_or_refused(make_cfg, tmp_path, case: str, overrides: list[str]) -> None:
    cfg = make_cfg(*_base(case), *overrides, run_dir=tmp_path / "run")
    expected = REFUSED_HERE.get(case)
    if expected and "trainer/" in case and __import__("torch").cuda.is_available():
        expected = None
    if expected is None:
        validate(cfg)
        train(cfg)
        grids = case != "callbacks/none"
        assert (tmp_path / "run" / "samples" / "step_0000001.png").is_file() == grids
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() == grids
        return
    with pytest.raises(DifflabError, match=expected) as e:
        validate(cfg)  # what the console script checks before Hydra starts
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training began


@pytest.mark.parametrize("case", CASES)
def test_every_group_choice_runs_or_is_refused_at_startup(make_cfg, tmp_path, case):
    group, name = case.rsplit("/", 1)
    fashion = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    if case == "data/fashion_mnist" and not fashion.is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make data installs it)")
    _run_or_refused(make_cfg, tmp_path, case, [f"{group}={name}", *NEEDS.get(case, lambda tmp: [])(tmp_path)])


VALUES = [
    *(("model=ddpm", f"model.noise_scheduler.beta_schedule={v}") for v in allowed(BetaSchedule)),
    *(("model=ddpm", f"model.noise_scheduler.prediction_type={v}") for v in PREDICTION_TYPES),
    ("model=ddpm", "model.noise_scheduler.rescale_betas_zero_snr=true"),
    *(f"model.lr_schedule={v}" for v in allowed(LRSchedule)),
    *(f"data.crop={v}" for v in allowed(Crop)),
    *(f"model.channels_last={str(v).lower()}" for v in allowed(ChannelsLast)),
    *(
        ("model=ddpm", f"callbacks.sample_grid.sampler={v}")
        for v in SAMPLERS
        if not v.startswith("flow_") and v != "meanflow"
    ),
    *(("model=flow", f"callbacks.sample_grid.sampler={v}") for v in FLOW_SAMPLERS),
    ("model=meanflow", "callbacks.sample_grid.sampler=meanflow", "callbacks.sample_grid.steps=2"),
    ("model=meanflow", "callbacks.sample_grid.sampler=meanflow", "model.immiscible=true"),
    ("model=flow", "model.min_snr_gamma=5.0", "model.noise_levels.density=uniform"),
    ("model=ddpm", "model.noise_levels.density=logit_normal"),
    "model.noise_levels.stratified=true",
    ("model=ddpm", "model.noise_levels.stratified=true"),
    "model.learned_weighting=true",
    ("model=ddpm", "model.learned_weighting=true", "model.min_snr_gamma=5.0"),
    "model.immiscible=true",
    ("model=ddpm", "model.immiscible=true"),
    ("model=ddpm", "model.min_snr_gamma=5.0"),
    "model.ema=null",
    "trainer.precision=bf16-mixed",
]


@pytest.mark.parametrize("override", VALUES)
def test_every_allowed_value_runs_to_a_sample_grid(make_cfg, tmp_path, override):
    overrides = (override,) if isinstance(override, str) else override
    cfg = make_cfg(*ONE_STEP, *overrides, run_dir=tmp_path / "run")
    validate(cfg)
    train(cfg)
    assert (tmp_path / "run" / "samples" / "step_0000001.png").is_file()


REFUSED_COMBOS = [
    *(
        (("model=ddpm", f"model.noise_scheduler.{key}", f"callbacks.sample_grid.sampler={name}"), name)
        for key, name in [
            ("prediction_type=sample", "euler_a"),
            ("prediction_type=sample", "pndm"),
            ("rescale_betas_zero_snr=true", "heun"),
            ("rescale_betas_zero_snr=true", "pndm"),
        ]
    ),
    (("callbacks.sample_grid.sampler=ddim",), "ddim"),  # the default model is a flow one
    (("model=flow", "callbacks.sample_grid.sampler=heun"), "heun"),
    (("model=ddpm", "callbacks.sample_grid.sampler=flow_euler"), "flow_euler"),
    (("model=flow", "callbacks.sample_grid.sampler=meanflow"), "meanflow"),
    (("model=meanflow", "callbacks.sample_grid.sampler=unipc"), "unipc"),
]


@pytest.mark.parametrize(("overrides", "sampler"), REFUSED_COMBOS)
def test_sampler_and_schedule_combinations_that_cannot_sample_are_refused(make_cfg, overrides, sampler):
    with pytest.raises(DifflabError, match=f"callbacks.sample_grid.sampler={sampler}: the {sampler} sampler"):
        validate(make_cfg(*ONE_STEP, *overrides))


def test_every_beta_schedule_samples_with_every_sampler():
    # The grid test above covers one sampler per schedule; this covers the whole product cheaply.
    import torch
    from diffusers import DDPMScheduler

    from difflab.diffusion.sampling import build_sampler, sample_batch
    from difflab.diffusion.unet import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    from difflab.diffusion.sampling import sampler_problem

    for schedule in allowed(BetaSchedule):
        for prediction in PREDICTION_TYPES:
            for zero_snr in (False, True):
                train_cfg = dict(
                    DDPMScheduler(
                        beta_schedule=schedule, prediction_type=prediction, rescale_betas_zero_snr=zero_snr
                    ).config
                )
                for name in SAMPLERS:
                    if sampler_problem(name, train_cfg):  # refused at start-up (test above)
                        with pytest.raises(DifflabError):
                            build_sampler(name, train_cfg)
                        continue
                    for steps in (3, 10):
                        images = sample_batch(
                            unet, build_sampler(name, train_cfg), range(2), seed=0, steps=steps
                        )
                        assert torch.isfinite(images).all(), (schedule, prediction, zero_snr, name, steps)
