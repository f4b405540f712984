"""experiments/gpu_check.py keeps working until a GPU is lent: its parts run on the CPU (--cpu-smoke)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from experiments import gpu_check

from difflab import precision
from difflab.compose import compose
from difflab.diffusion.loss_window import LossWindow
from difflab.train import COMMAND as TRAIN


@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the parts after syncs see them too
def test_cpu_smoke_runs_the_in_process_parts_and_reports_syncs(tmp_path, monkeypatch, capsys):
    # No CUDA here: pretend the sync debug mode is on and that the loss window asks for a sync each
    # step, to see the report name difflab's line and the step it happened in.
    monkeypatch.setattr(gpu_check.Check, "cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    real_add = LossWindow.add

    def syncing_add(self, *args):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        return real_add(self, *args)

    monkeypatch.setattr(LossWindow, "add", syncing_add)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "syncs,grid,fid,speed"]) == 0

    printed = capsys.readouterr().out
    assert "difflab GPU check: CPU smoke run" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["part"] for r in results["rows"]] == ["syncs", "grid", "fid", "speed"]
    assert all(r["ok"] for r in results["rows"]), results
    (site,) = json.loads((tmp_path / "syncs.json").read_text())
    assert site["count"] == 3 and site["in_step"]  # one per step, inside the optimizer step
    assert site["site"].startswith("difflab/diffusion/module.py:") and site["site"].endswith("training_step")
    assert "3 syncs in 3 steps, 3 inside steps" in results["rows"][0]["result"]
    assert (tmp_path / "grid" / "grid.png").is_file()
    assert (
        "bf16-mixed NHWC" in results["rows"][3]["result"] and "32-true NCHW" in results["rows"][3]["result"]
    )


def test_a_failed_part_is_a_row_and_exit_status_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "grid", lambda c: 1 / 0)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "grid"]) == 1
    assert "| grid | NO |" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--parts", "grid,bogus", "--cpu-smoke"], []])
def test_bad_arguments_and_no_gpu_are_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown part" in capsys.readouterr().err or not argv


@pytest.mark.slow
def test_cpu_smoke_ddp_and_sigterm_resume(tmp_path, capsys):
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "ddp,sigterm"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["result"].startswith("2 ranks") and "resumed to 200" in rows[1]["result"]


@pytest.mark.parametrize("fashion", [True, False], ids=["fashion_mnist", "digits_fallback"])
def test_the_gpu_command_lines_pass_the_start_up_checks(tmp_path, monkeypatch, fashion):
    """The training command lines only the GPU run uses (trainer=gpu and ddp, the default job's data)
    pass difflab's start-up checks, with a bf16 GPU faked: a mistake there would show only the day a
    GPU is lent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda: True)
    if not fashion:
        monkeypatch.setattr(gpu_check, "FASHION", tmp_path / "absent")
    c = gpu_check.Check(tmp_path, smoke=False)
    lines = [
        c.job_args(tmp_path / "train"),
        *(
            gpu_check.speed_args(c, p, cl, tmp_path / p)
            for p in ("bf16-mixed", "32-true")
            for cl in ("false", "true")
        ),
        gpu_check.ddp_args(c, tmp_path / "ddp"),
        gpu_check.sigterm_args(c, tmp_path / "sigterm"),
    ]
    for args in lines:
        cfg = compose("train", args)
        assert TRAIN.problems(cfg) == [], args
        assert cfg.trainer.accelerator == "gpu" and cfg.data.resolution == 28
        assert cfg.data.source._target_.endswith("fashion_mnist_source" if fashion else "digits_source")
    assert cfg.trainer.precision == "bf16-mixed"  # the default job's precision on a bf16 GPU
    assert "trainer=ddp" in lines[-2] and "trainer=gpu" not in lines[-2]
