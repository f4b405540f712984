"""Every config in every group composes and instantiates; bad values fail at start-up with a clear message."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
from diffusers import UNet2DModel
from omegaconf import DictConfig

from difflab.compose import rewrite_group_aliases
from difflab.config import CONF_DIR
from difflab.data.datamodule import ImageDataModule
from difflab.diffusion.module import DiffusionModule
from difflab.errors import DifflabError
from difflab.train import COMMAND, instantiate_group

validate = COMMAND.check  # every start-up check `difflab-train` runs before Hydra starts

CONF = Path(CONF_DIR)


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "default" or group == "paths")


def test_train_config_composes_with_defaults(make_cfg):
    cfg = make_cfg()
    assert cfg.data.source._target_.endswith("fashion_mnist_source")
    assert cfg.model.unet.block_out_channels == [32, 64, 128]
    assert cfg.seed == 42 and cfg.ckpt_path == "last"


@pytest.mark.parametrize("name", names("data"))
def test_data_configs_instantiate(make_cfg, name):
    extra = {
        "folder": ["data.source.path=/tmp"],
        "hf": ["data.source.name=/tmp/x"],
        "streaming": ["data.source.path=/tmp/shards"],
    }.get(name, [])
    cfg = make_cfg(f"data={name}", *extra)
    validate(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule)
    assert dm.channels == cfg.data.channels and dm.resolution == cfg.data.resolution


@pytest.mark.parametrize("name", names("model/unet"))
def test_unet_presets_instantiate(make_cfg, name):
    res = {"diffusers_64": 64, "tiny": 8}.get(name, 32)
    cfg = make_cfg(f"model/unet={name}", "data=digits", f"data.resolution={res}")
    validate(cfg)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, DiffusionModule)
    assert isinstance(model.unet, UNet2DModel)
    assert model.unet.config.sample_size == res and model.unet.config.in_channels == 1


def _params(cfg: DictConfig) -> int:
    return sum(p.numel() for p in hydra.utils.instantiate(cfg.model.unet).parameters())


def test_parameter_counts_match_the_papers(make_cfg):
    # DDPM paper: 35.7M for CIFAR-10; the diffusers example's default: 113.7M.
    assert round(_params(make_cfg("model/unet=ddpm_cifar10", "data=cifar10")) / 1e5) == 357
    assert (
        round(_params(make_cfg("model/unet=diffusers_64", "data=cifar10", "data.resolution=64")) / 1e5)
        == 1137
    )


@pytest.mark.parametrize("name", names("trainer"))
def test_trainer_configs_instantiate(make_cfg, name):
    cfg = make_cfg(f"trainer={name}")
    assert cfg.trainer.use_distributed_sampler is False
    if name in ("default", "cpu", "ddp_cpu"):
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer)
        assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", names("logger"))
def test_logger_configs_instantiate(make_cfg, name):
    cfg = make_cfg(f"logger={name}", "logger.wandb.offline=true" if name == "wandb" else "seed=1")
    loggers = instantiate_group(cfg.get("logger"))
    expected = {"csv": 1, "tensorboard": 1, "wandb": 1, "many": 2, "none": 0}[name]
    assert len(loggers) == expected


@pytest.mark.parametrize("name", names("callbacks"))
def test_callback_configs_instantiate(make_cfg, name):
    cfg = make_cfg(f"callbacks={name}")
    callbacks = instantiate_group(cfg.get("callbacks"))
    assert all(isinstance(c, L.Callback) for c in callbacks)
    if name == "default":
        assert {type(c).__name__ for c in callbacks} >= {"RunCheckpoint", "SampleGridCallback"}


@pytest.mark.parametrize("name", names("debug"))
def test_debug_configs_compose(make_cfg, name):
    cfg = make_cfg(f"debug={name}")
    validate(cfg)
    assert cfg.trainer.max_steps > 0


@pytest.mark.parametrize("name", names("experiment"))
def test_experiments_compose_and_instantiate(make_cfg, name):
    cfg = make_cfg(f"experiment={name}")
    validate(cfg)
    assert isinstance(hydra.utils.instantiate(cfg.model), DiffusionModule)
    assert isinstance(hydra.utils.instantiate(cfg.data), ImageDataModule)


def test_experiment_digits_overrides_groups(make_cfg):
    cfg = make_cfg("experiment=digits")
    assert cfg.data.resolution == 8 and cfg.model.unet.block_out_channels == [16, 32]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=ddpm model.noise_scheduler.prediction_type=eps", "allowed: epsilon, sample, v_prediction"),
        ("model=ddpm model.noise_scheduler.beta_schedule=cosine", "allowed: linear, scaled_linear"),
        ("data.crop=middle", "data.crop=middle is not valid; allowed: center, random"),
        ("data.channels=2", "data.channels=2 is not valid; allowed: 1, 3"),
        ("trainer.precision=8-bit", "trainer.precision=8-bit is not valid"),
        ("callbacks.sample_grid.sampler=magic", "callbacks.sample_grid.sampler=magic is not valid"),
        ("model.lr_schedule=step", "model.lr_schedule=step is not valid; allowed: constant, cosine, linear"),
        ("data.resolution=30", "data.resolution=30 must be divisible by 4"),
        ("model.channels_last=yes", "model.channels_last=yes is not valid; allowed: auto or true or false"),
    ],
)
def test_invalid_values_name_the_key_and_allowed_values(make_cfg, override, message):
    cfg = make_cfg(*override.split())
    with pytest.raises(DifflabError) as e:
        validate(cfg)
    assert message in str(e.value)


def test_fp16_on_cpu_is_refused_at_startup(make_cfg):
    with pytest.raises(DifflabError, match="16-mixed needs a GPU"):
        validate(make_cfg("trainer=cpu", "trainer.precision=16-mixed"))


def test_typo_in_a_key_fails_at_compose(make_cfg):
    with pytest.raises(Exception, match="batch_sise"):
        make_cfg("data.batch_sise=3")


def test_model_unet_dot_spelling_selects_the_preset():
    assert rewrite_group_aliases(["x", "model.unet=tiny", "data=digits"]) == [
        "x",
        "model/unet=tiny",
        "data=digits",
    ]
    # Read by Hydra's override parser: sweeps and prefixes as Hydra writes them; null (no EMA: a value),
    # a key inside the group, a dict value, a flag and what Hydra cannot parse stay as given.
    assert rewrite_group_aliases(
        [
            "model.unet=tiny,small",
            "model.ema=null",
            "+model.ema=posthoc",
            "model.unet.sample_size=8",
            "model.unet={sample_size: 8}",
            "--cfg",
            "model.unet=[",
        ]
    ) == [
        "model/unet=tiny,small",
        "model.ema=null",
        "+model/ema=posthoc",
        "model.unet.sample_size=8",
        "model.unet={sample_size: 8}",
        "--cfg",
        "model.unet=[",
    ]


def test_preflight_ignores_the_hydra_config_an_earlier_run_left(tmp_path):
    """In one process (tests, notebooks) a composed or finished run leaves Hydra's run config behind;
    the next command's start-up checks must see what a fresh process sees, not its stale output dir."""
    from difflab.cli import preflight
    from difflab.train import COMMAND
    from tests.conftest import compose_config

    compose_config(tmp_path / "earlier", ["experiment=digits"])  # leaves runtime.output_dir unset (null)
    preflight(COMMAND, ["experiment=digits", "trainer.max_steps=3"])  # raised: paths.output_dir=null ...
