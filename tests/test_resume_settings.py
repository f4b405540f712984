"""A run dir at start-up (rundir.py): a resume with changed settings is refused or applied and logged,
a resume into the other objective writes nothing, and one run at a time holds a run dir.

The runs go through the console-script function in this process (the same path as the installed
script, without ~4 s of imports per subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from difflab.rundir import LOCK_NAME, changed_settings
from difflab.train import COMMAND as TRAIN
from tests.conftest import FAST_DIGITS

RUN = (*FAST_DIGITS, "trainer.max_steps=5", "model.lr_schedule=constant")


def _train(run: Path, *args: str) -> int:
    try:
        TRAIN.main([*RUN, f"hydra.run.dir={run}", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("difflab: error:")]


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run dir, by relative path (what a refused start must leave as it was)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 5-step flow run (``last.ckpt`` at step 5), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        assert _train(run) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    return run


def _copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(trained), str(run)], check=True)
    return run


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["model.optimizer.lr=0.5"], "model.optimizer.lr 0.002 -> 0.5"),
        (["data.batch_size=4"], "data.batch_size 64 -> 4"),
        (["data.source.max_items=100"], "data.source.max_items null -> 100"),
        (["seed=3"], "seed 42 -> 3"),
        (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches 1 -> 2"),
        (["model=ddpm"], "it was trained with model=flow, this run is model=ddpm"),  # item 11
    ],
)
def test_resume_with_a_setting_that_must_stay_is_refused_and_writes_nothing(
    trained, tmp_path, monkeypatch, capsys, args, named
):
    run = _copy(trained, tmp_path)
    before = _snapshot(run)
    monkeypatch.chdir(tmp_path)
    assert _train(run, *args) == 2
    (error,) = _errors(capsys)
    assert named in error and "hydra.run.dir=<new dir>" in error, error
    assert _snapshot(run) == before  # not .hydra/, not the log, not config.yaml, not the lock


def test_resume_applies_and_logs_an_allowed_change(trained, tmp_path, monkeypatch):
    run = _copy(trained, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _train(run, "trainer.max_steps=7", "trainer.log_every_n_steps=2") == 0
    log = (run / "train.log").read_text()
    assert (
        "resuming with changed settings: trainer.log_every_n_steps 10 -> 2; trainer.max_steps 5 -> 7" in log
    )
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 7  # what ran
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 7 and ckpt["difflab"]["config"]["trainer"]["max_steps"] == 7


def test_changed_settings_sorts_each_key_once():
    old = {"model": {"optimizer": {"lr": 0.002}}, "trainer": {"max_steps": 5}, "paths": {"output_dir": "/a"}}
    new = {"model": {"optimizer": {"lr": 0.002}}, "trainer": {"max_steps": 9}, "paths": {"output_dir": "/b"}}
    new["callbacks"] = {"model_checkpoint": {"dirpath": "/b/checkpoints"}}
    old["callbacks"] = {"model_checkpoint": {"dirpath": "/a/checkpoints"}}
    new["model"]["ema"] = {"snapshot_dir": "/b/ema"}  # the run moved: the same ${paths.output_dir}/ema
    old["model"]["ema"] = {"snapshot_dir": "/a/ema"}
    assert changed_settings(old, new) == ([], ["trainer.max_steps 5 -> 9"])
    new["model"]["new_key"] = 1  # a key the run's (older) difflab never had: taken, and logged
    assert changed_settings(old, new) == ([], ["model.new_key (unset) -> 1", "trainer.max_steps 5 -> 9"])
    del new["model"]["ema"]  # a key the run had and this config lacks (`~model.ema`): refused
    assert changed_settings(old, new)[0] == ["model.ema.snapshot_dir ${paths.output_dir}/ema -> (unset)"]
    old["model"]["ema"], new["model"]["ema"] = None, {"decay": 0.999}  # trained without EMA, now with
    assert changed_settings(old, new)[0] == ["model.ema null -> (unset)", "model.ema.decay (unset) -> 0.999"]


def test_a_run_recorded_before_a_rename_resumes_under_the_new_names():
    """compose.RENAMED: model.timesteps & co. became model.noise_levels.*; the run's recorded values are
    read under the new names (same value: no change; another value: refused as a change of that key)."""
    old = {"model": {"timesteps": "logit_normal", "logit_std": 1.0, "stratified": False}}
    levels = {"_target_": "difflab.diffusion.noise.NoiseLevels", "density": "logit_normal", "logit_std": 1.0}
    new = {"model": {"noise_levels": {**levels, "stratified": False}}}
    refused, allowed = changed_settings(old, new)
    assert refused == [] and allowed == [
        "model.noise_levels._target_ (unset) -> difflab.diffusion.noise.NoiseLevels"
    ]
    new["model"]["noise_levels"]["density"] = "uniform"
    assert changed_settings(old, new)[0] == ["model.noise_levels.density logit_normal -> uniform"]


# A process that holds a run dir's lock as a running difflab-train does, until it is killed.
_HOLDER = """
import sys, time
from pathlib import Path
from difflab.rundir import lock_run_dir
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_into_a_held_run_dir_is_refused_and_a_killed_holder_frees_it(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.chdir(tmp_path)
        assert _train(run) == 2
        (error,) = _errors(capsys)
        assert f"hydra.run.dir={run} is in use by another running difflab-train (pid {holder.pid})" in error
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no .hydra/, no log
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as kill -9 or a crash would
        holder.wait()
    assert _train(run) == 0  # the kernel dropped the dead holder's lock: nothing stuck
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_dir_another_rank_creates_meanwhile_is_taken_not_refused(tmp_path, monkeypatch):
    """make_writable_dir races the other ranks of its job (each checks the shared cache and run dirs):
    a dir that appears between the existence check and mkdir is theirs, fine, and not removed."""
    from difflab.rundir import make_writable_dir

    target = tmp_path / "cache"
    real_mkdir = Path.mkdir

    def raced(self, *args, **kwargs):
        real_mkdir(self)  # the other rank got there first
        raise FileExistsError(17, "File exists", str(self))

    monkeypatch.setattr(Path, "mkdir", raced)
    assert make_writable_dir(target, "metrics.cache_dir") == [] and target.is_dir()
