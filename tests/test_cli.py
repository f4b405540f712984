"""The real command line, in a subprocess, as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_train_cli_writes_checkpoint_and_grid(tmp_path):
    run_dir = tmp_path / "run"
    p = run(
        "difflab-train",
        "experiment=digits",
        "trainer.max_steps=6",
        "data.batch_size=32",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.sample_grid.steps=3",
        "trainer.log_every_n_steps=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert grids == ["step_0000003.png", "step_0000006.png"]
    grid = Image.open(run_dir / "samples" / "step_0000006.png")
    assert grid.size == (4 * 8 + 5 * 2, 4 * 8 + 5 * 2)  # 16 images of 8 px in a 4x4 grid, 2 px padding
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["difflab"]["config"]["data"]["batch_size"] == 32
    assert (run_dir / "config.yaml").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def test_default_run_dirs_never_collide(tmp_path):
    from difflab.config import new_run_dir

    dirs = {new_run_dir(str(tmp_path)) for _ in range(200)}
    assert len(dirs) == 200  # same second, still distinct
    ckpt = tmp_path / "runs" / "r1" / "checkpoints" / "last.ckpt"
    assert new_run_dir(str(tmp_path), str(ckpt)) == str(tmp_path / "runs" / "r1")  # resume continues the run


def test_bad_value_is_one_line_error(tmp_path):
    p = run(
        "difflab-train",
        "experiment=digits",
        "model=ddpm",
        "model.noise_scheduler.prediction_type=noise",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("difflab: error:")]
    assert len(err) == 1 and "allowed: epsilon, sample, v_prediction" in err[0]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_two_identical_runs_into_one_run_dir_one_is_refused(tmp_path):
    """Issue 27, item 10, as users hit it: the same command started twice at once."""
    import time

    run_dir = tmp_path / "run"
    # Long enough for the second start to reach the lock while the first trains.
    args = [
        "experiment=digits",
        "debug=fast",
        "trainer.max_steps=2000",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        [str(BIN / "difflab-train"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = run_dir / ".lock"
    t0 = time.time()
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.time() - t0 < 300
        time.sleep(0.1)
    second = run(*["difflab-train", *args], cwd=tmp_path)
    assert first.poll() is None, first.stderr.read()[-3000:]
    first.send_signal(signal.SIGTERM)  # the preemption callback saves and stops it
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"difflab: error: hydra.run.dir={run_dir} is in use by another running difflab-train "
        f"(pid {first.pid}); wait for it to end, or start this run elsewhere with hydra.run.dir=<new dir>"
    )
    assert (run_dir / "train.log").read_text().count("run dir:") == 1  # one run's log, not two interleaved


def test_an_in_process_command_leaves_sys_argv_and_the_logging_filters_as_it_found_them(
    tmp_path, monkeypatch
):
    import logging

    from difflab.sample import COMMAND as SAMPLE

    monkeypatch.chdir(tmp_path)
    before, tips = list(sys.argv), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    SAMPLE.main(["--cfg", "job", "ckpt=/no/such.ckpt"])  # reaches Hydra (which reads sys.argv): prints
    filters = list(tips.filters)
    SAMPLE.main(["--cfg", "job", "ckpt=/no/such.ckpt"])
    assert sys.argv == before and tips.filters == filters
