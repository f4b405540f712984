"""Shared fixtures: compose the real Hydra configs into a temporary run dir."""

from __future__ import annotations

import hashlib
import os
import shutil
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
# Under pytest-xdist (`-n 2`) each worker, and every command it starts, gets its share of the cores:
# OpenMP threads spin while they wait, so two processes of 2 threads on 2 cores ran ~20x slower.
_THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(_THREADS)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


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


class TrainedRuns:
    """Runs trained once per test session and shared by every test that asks for the same overrides
    (and across pytest-xdist workers: the first to ask trains, under a file lock, the others wait).
    A test reads a shared run and never writes into it: one that resumes or changes a run copies it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *overrides: str) -> Path:
        """The run dir of ``difflab-train <overrides>`` (in-process, this test process's settings)."""
        from filelock import FileLock

        from difflab.train import train

        key = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:12]
        run, done = self.root / key, self.root / f"{key}.done"
        with FileLock(self.root / f"{key}.lock"):
            if not done.exists():
                shutil.rmtree(run, ignore_errors=True)  # a worker that died mid-training left it
                train(compose_run(run, overrides, "train"))
                HydraConfig.instance().cfg = None
                done.write_text("\n".join(overrides))
        return run


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, worker_id: str) -> TrainedRuns:
    # One folder for the whole session: pytest-xdist gives each worker its own base temp dir, under a
    # common parent (the pattern of pytest-xdist's docs for session data shared between workers).
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "trained_runs"
    root.mkdir(exist_ok=True)
    return TrainedRuns(root)


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

# Runs several test files read (through the ``trained_runs`` fixture, trained once per session).
FLOW_30 = (*FAST_DIGITS, "trainer.max_steps=30")  # the default objective, 30 steps
DDPM_2 = (*FAST_DIGITS, "trainer.max_steps=2", "model=ddpm")
POSTHOC_22 = (*FAST_DIGITS, "model/ema=posthoc", "model.ema.snapshot_every=5", "trainer.max_steps=22")

# The kill -9 / preemption run (test_preemption.py; test_reliability.py's NaN and disk runs too). Digits:
# 1,797 images / batch 64 = 28 steps an epoch. 70 steps = 2.5 epochs; a checkpoint every 7 steps puts
# one exactly on the epoch boundaries (28, 56) and others inside epochs. Warm-up ends at
# step 10, so the cosine schedule (which depends on max_steps) is in force for most of the run.
DIGITS_70 = (
    "experiment=digits",
    "seed=7",
    "trainer.max_steps=70",
    "model.warmup_steps=10",
    "data.flip=true",
    "callbacks.model_checkpoint.every_n_train_steps=7",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "logger=none",
    "trainer.enable_model_summary=false",
)


def streaming_run(shards: Path, *extra: str) -> tuple[str, ...]:
    """DIGITS_70 from a shard set of difflab-prepare."""
    rest = tuple(a for a in DIGITS_70 if a != "experiment=digits")
    return (
        "experiment=digits",
        "data=streaming",
        f"data.source.path={shards}",
        "data.resolution=8",
        "data.channels=1",
        *rest,
        *extra,
    )


# 1,797 digits in ~12 chunks of 5 KB: training shuffles chunk order, blocks and items inside chunks.
SMALL_CHUNKS = "chunk_bytes=5KB"


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> Path:
    """The digits as LitData shards (test_streaming.py, test_preemption.py)."""
    from difflab.prepare import COMMAND as PREPARE

    out = tmp_path_factory.mktemp("shards") / "digits"
    PREPARE.call(["data=digits", f"out={out}", SMALL_CHUNKS, "num_workers=2"])
    return out


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, trained_runs) -> dict[str, Path]:
    """What the inference commands are tried on (test_bad_inference_inputs.py, test_sample.py,
    test_export.py): digits checkpoints of the flow default, of DDPM, one without EMA weights, one
    trained on a folder since moved, a truncated file; an exported pipeline and one with truncated
    weights."""
    root = tmp_path_factory.mktemp("ckpts")
    flow = trained_runs(*FLOW_30) / "checkpoints" / "last.ckpt"
    state = torch.load(flow, weights_only=True)
    del state["ema"]
    torch.save(state, root / "noema.ckpt")
    (root / "truncated.ckpt").write_bytes(flow.read_bytes()[:5000])
    folder = {"_target_": "difflab.data.sources.FolderSource", "_partial_": True, "path": str(root / "moved")}
    state["difflab"]["config"]["data"]["source"] = folder  # trained on a folder since moved away
    torch.save(state, root / "moved.ckpt")
    from difflab.export import COMMAND as EXPORT

    EXPORT.call([f"ckpt={flow}", f"out={root / 'pipe'}"])
    damaged = root / "damaged"
    shutil.copytree(root / "pipe", damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    return {
        "flow": flow,
        "ddpm": trained_runs(*DDPM_2) / "checkpoints" / "last.ckpt",
        "noema": root / "noema.ckpt",
        "pipe": root / "pipe",
        "truncated": root / "truncated.ckpt",
        "damaged": damaged,
        "moved": root / "moved.ckpt",
    }
