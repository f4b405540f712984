"""RunRecord, the difflab part of a checkpoint: one writer and one reader, and checkpoints written before
it existed (format 1) still load for sampling and still resume.

tests/data/checkpoint_before_run_record.ckpt was written by difflab at d353316 (the last commit before
RunRecord) with `difflab-train experiment=digits "model.unet.block_out_channels=[8,8]"
model.unet.norm_num_groups=4 trainer.max_steps=3 logger=none callbacks.sample_grid=null`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.inference import load_trained_unet, schedule_of
from difflab.run_record import FORMAT, RunRecord
from difflab.train import train
from tests.conftest import FAST_DIGITS

OLD = Path(__file__).parent / "data" / "checkpoint_before_run_record.ckpt"
OLD_UNET = ("model.unet.block_out_channels=[8,8]", "model.unet.norm_num_groups=4")


def test_a_format_1_checkpoint_reads_with_its_ema_kind_inferred():
    ckpt = load_checkpoint(OLD)
    assert "format" not in ckpt["difflab"] and "ema_kind" not in ckpt["difflab"]  # what format 1 lacked
    record = RunRecord.from_checkpoint(ckpt, OLD)
    assert record.ema_kind == "standard" and record.snapshot_dir is None
    assert record.objective == "flow" and record.unet_config["block_out_channels"] == [8, 8]
    assert record.noise_seed == ckpt["difflab"]["noise_seed"] and record.config["trainer"]["max_steps"] == 3
    assert schedule_of(OLD) == record.scheduler_config


def test_a_format_1_checkpoint_samples_with_its_ema_weights():
    unet, scheduler_config, config = load_trained_unet(OLD)
    shadow = load_checkpoint(OLD)["ema"]["shadow_params"]
    assert all(torch.equal(p, s) for p, s in zip(unet.parameters(), shadow, strict=True))
    assert scheduler_config == load_checkpoint(OLD)["difflab"]["scheduler_config"]
    assert config["seed"] == load_checkpoint(OLD)["difflab"]["config"]["seed"]


def test_a_format_1_checkpoint_resumes_and_is_rewritten_as_format_2(make_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD, run / "checkpoints" / "last.ckpt")
    # The settings it was trained with (a resume keeps them): console defaults, bf16-mixed on that CPU.
    same = [o for o in FAST_DIGITS if not o.startswith(("trainer.devices=", "trainer.precision="))]
    train(make_cfg(*same, *OLD_UNET, "trainer.precision=bf16-mixed", "trainer.max_steps=6", run_dir=run))
    new = load_checkpoint(run / "checkpoints" / "last.ckpt")
    old = load_checkpoint(OLD)
    assert new["global_step"] == 6 and new["difflab"]["format"] == FORMAT
    assert (
        new["difflab"]["ema_kind"] == "standard"
        and new["difflab"]["noise_seed"] == old["difflab"]["noise_seed"]
    )
    assert new["ema"]["optimization_step"] == 6  # the EMA went on from step 3, not from a fresh start


def test_to_and_from_checkpoint_round_trip():
    record = RunRecord(
        unet_config={"sample_size": 8},
        scheduler_config={"shift": 3.0},
        noise_seed=7,
        config={"seed": 1},
        log_window={"steps": 2},
        ema_kind="posthoc",
        snapshot_dir="/runs/a/ema_snapshots",
    )
    checkpoint: dict = {}
    record.to_checkpoint(checkpoint)
    assert checkpoint["difflab"]["format"] == FORMAT
    assert RunRecord.from_checkpoint(checkpoint) == record


def test_format_1_post_hoc_ema_reads_its_kind_from_the_ema_state_and_its_folder_from_the_config():
    checkpoint = {
        "difflab": {
            "unet_config": {},
            "scheduler_config": {},
            "noise_seed": 1,
            "config": {"model": {"ema": {"snapshot_dir": "/runs/a/ema_snapshots"}}},
        },
        "ema": {"kind": "posthoc"},
    }
    record = RunRecord.from_checkpoint(checkpoint)
    assert record.ema_kind == "posthoc" and record.snapshot_dir == "/runs/a/ema_snapshots"
    # A moved run dir: the recorded folder is gone, the snapshots are beside the checkpoints/ folder.
    assert record.snapshots("/moved/run/checkpoints/last.ckpt") == Path("/moved/run/ema_snapshots")
    assert RunRecord.from_checkpoint({**checkpoint, "ema": None}).ema_kind == "none"


def test_a_file_from_a_newer_difflab_or_without_a_record_is_one_line():
    with pytest.raises(DifflabError, match=r"newer difflab \(checkpoint format 99"):
        RunRecord.from_checkpoint(
            {"difflab": {"unet_config": {}, "scheduler_config": {}, "format": 99}}, "x.ckpt"
        )
    with pytest.raises(DifflabError, match=r"x\.ckpt is not a difflab training checkpoint"):
        RunRecord.from_checkpoint({"state_dict": {}}, "x.ckpt")
