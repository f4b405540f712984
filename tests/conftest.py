"""Shared fixtures: compose the real Hydra configs into a temporary run dir."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from difflab.compose import compose_run

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def compose_config(
    run_dir: Path, overrides: list[str] | tuple[str, ...] = (), config_name: str = "train"
) -> DictConfig:
    """The config `difflab-train <overrides>` would run with, writing everything under ``run_dir``."""
    return compose_run(run_dir, overrides, config_name)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Each test starts and ends with no Hydra config set and its own ``sys.argv`` (as the
    Lightning-Hydra template's conftest does): ``compose_config`` and in-process commands set both,
    and a later test would otherwise resolve ``${hydra:runtime.output_dir}`` from a stale config."""
    import sys

    argv = list(sys.argv)
    HydraConfig.instance().cfg = None
    yield
    sys.argv[:] = argv
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(*overrides: str, run_dir: Path | None = None, config_name: str = "train") -> DictConfig:
        return compose_config(run_dir or tmp_path / "run", overrides, config_name)

    return _make


# A digits run that finishes in seconds: no loggers, no progress bar, on the CPU, in fp32 (the default
# precision follows the hardware, test_precision.py; in-process figures must not. Console-script runs
# keep the default: on an AMX CPU they train in bf16-mixed, e.g. the kill -9 resume tests).
FAST = (
    "experiment=digits",
    "logger=none",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
)
FAST_DIGITS = (*FAST, "callbacks.sample_grid=null")  # ... and no sample grids
