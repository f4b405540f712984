"""A run you can trust: NaN, corrupt or foreign files and a full disk stop with one line and never cost a
good checkpoint (kill -9 and preemption: test_preemption.py)."""

from __future__ import annotations

import errno
import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch

import difflab.files
from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import DIGITS_70 as RUN
from tests.conftest import FAST_DIGITS
from tests.helpers import difflab_cli, max_abs_diff


# ------------------------------------------------------------------------------------------- NaN/Inf
def test_divergence_stops_the_run_with_one_line_and_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = difflab_cli(
        "train", *RUN, "model.optimizer.lr=1e6", "model.warmup_steps=1", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("difflab: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"training diverged: the (loss|weights or EMA) became NaN/Inf at steps? ", errors[0])
    assert "lower model.optimizer.lr (now 1000000.0)" in errors[0]
    assert "no checkpoint was written" in errors[0]
    # within one logging window (digits logs every 10 steps; a checkpoint every 7 checks too)
    assert int(re.search(r"at steps? (?:1-)?([0-9]+) ", errors[0])[1]) <= 10
    assert not list(run.glob("checkpoints/*.ckpt"))


class PoisonEMA:
    """Makes one EMA tensor NaN after step ``step`` (the loss stays finite: only the save check sees it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, module, *args) -> None:
        if module.global_step >= self.step:
            module.ema.shadow_params[0].fill_(float("nan"))


def test_nonfinite_weights_never_replace_a_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    args = (*FAST_DIGITS, "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.log_every_n_steps=50")
    train(make_cfg(*args, "trainer.max_steps=5", run_dir=tmp_path / "run"))
    good = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    from difflab.diffusion.module import DiffusionModule

    real_step = DiffusionModule.optimizer_step

    def step_then_poison(self, *a, **k):
        real_step(self, *a, **k)
        PoisonEMA(7)(self)

    monkeypatch.setattr(DiffusionModule, "optimizer_step", step_then_poison)
    with pytest.raises(
        DifflabError,
        match=r"the weights or EMA became NaN/Inf at step 10 \(the checkpoints in .* predate it\)",
    ):
        train(make_cfg(*args, "trainer.max_steps=20", run_dir=tmp_path / "run"))
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 5 and max(max_abs_diff(good, after).values()) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000005.ckpt",
    ]


# --------------------------------------------------------------------------- corrupt / foreign files
def _two_checkpoints(make_cfg, run: Path) -> tuple[str, ...]:
    args = (
        *FAST_DIGITS,
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    train(make_cfg(*args, "trainer.max_steps=10", run_dir=run))
    return args


def test_truncated_last_ckpt_falls_back_to_the_newest_readable_one(make_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    args = _two_checkpoints(make_cfg, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # a copy cut short
    step10 = run / "checkpoints" / "step_0000010.ckpt"
    step10.write_bytes(b"")  # and the newest step checkpoint empty
    with caplog.at_level(logging.WARNING, logger="difflab.checkpoints"):
        train(make_cfg(*args, "trainer.max_steps=15", run_dir=run))
    warnings = [r.getMessage() for r in caplog.records if r.name == "difflab.checkpoints"]
    assert len(warnings) == 1
    assert str(last) in warnings[0] and "truncated or corrupt" in warnings[0]
    assert str(step10) in warnings[0] and "resuming from" in warnings[0]
    assert warnings[0].endswith(str(run / "checkpoints" / "step_0000005.ckpt") + " instead")
    assert load_checkpoint(last)["global_step"] == 15


def test_every_checkpoint_unreadable_is_an_error_not_a_fresh_start(make_cfg, tmp_path):
    run = tmp_path / "run"
    args = _two_checkpoints(make_cfg, run)
    for f in (run / "checkpoints").glob("*.ckpt"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(DifflabError, match=r"no readable checkpoint in .*move them away"):
        train(make_cfg(*args, "trainer.max_steps=15", run_dir=run))


@pytest.fixture
def foreign_files(tmp_path) -> dict[str, Path]:
    class Payload:
        def __reduce__(self):
            return (print, ("this ran code from the file",))

    files = {
        "text": tmp_path / "notes.ckpt",
        "empty": tmp_path / "empty.ckpt",
        "pickle": tmp_path / "evil.ckpt",
    }
    files["text"].write_text("hello\n")
    files["empty"].write_bytes(b"")
    torch.save({"x": Payload()}, files["pickle"])
    files["tensors"] = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, files["tensors"])
    return files


EXPECTED = {
    "text": "is not a difflab checkpoint: it is not a PyTorch checkpoint file",
    "empty": "is not a difflab checkpoint: it is an empty file",
    "pickle": "holds Python objects a checkpoint never contains",
    "tensors": "is not a difflab training checkpoint",
}


@pytest.mark.parametrize(
    "command",
    [("train", "experiment=digits", "ckpt_path={}"), ("sample", "ckpt={}"), ("export", "ckpt={}", "out=x")],
)
def test_a_file_that_is_no_checkpoint_gets_one_line(foreign_files, tmp_path, command, monkeypatch, capsys):
    # In-process through each console script's main (the installed script's code path; a subprocess
    # per file cost ~5 s of imports each): test_cli.py runs the real scripts.
    from difflab.export import COMMAND as EXPORT
    from difflab.sample import COMMAND as SAMPLE
    from difflab.train import COMMAND as TRAIN

    main = {"train": TRAIN, "sample": SAMPLE, "export": EXPORT}[command[0]].main
    monkeypatch.chdir(tmp_path)
    for kind, path in foreign_files.items():
        with pytest.raises(SystemExit) as e:
            main([a.format(path) for a in command[1:]])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "weights_only" not in err, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("difflab: error:")]
        assert len(errors) == 1 and f"{path} " in errors[0] and EXPECTED[kind] in errors[0], err[-2000:]
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------- disk full
class _FullDisk:
    """A file on a disk that fills up after ``room`` bytes: writes past it raise ENOSPC."""

    def __init__(self, path, mode, room: int) -> None:
        self.f, self.room = open(path, mode), room  # noqa: SIM115

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_disk_full_while_saving_is_one_line_and_loses_nothing(make_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = (*FAST_DIGITS, "callbacks.model_checkpoint.every_n_train_steps=5")
    train(make_cfg(*args, "trainer.max_steps=5", run_dir=run))
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(difflab.files, "open", lambda p, m: _FullDisk(p, m, room=100_000), raising=False)
    step10 = run / "checkpoints" / "step_0000010.ckpt"
    with pytest.raises(DifflabError) as e:
        train(make_cfg(*args, "trainer.max_steps=10", run_dir=run))
    assert str(e.value) == (
        f"no space left on device writing {step10}; the previous checkpoint "
        f"{run / 'checkpoints' / 'last.ckpt'} is intact; free space and rerun"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000005.ckpt"]
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == good


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # 4 MB: one 2.8 MB checkpoint fits, the second does not.
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = mnt / "run"
        p = difflab_cli("train", *RUN, "trainer.max_steps=14", f"hydra.run.dir={run}", cwd=tmp_path)
        assert p.returncode != 0
        errors = [line for line in p.stderr.splitlines() if line.startswith("difflab: error:")]
        assert len(errors) == 1, p.stderr[-3000:]
        assert errors[0].startswith(f"difflab: error: no space left on device writing {run}/checkpoints/")
        assert "is intact" in errors[0]
        assert not list(run.glob("checkpoints/.*.tmp"))
        assert load_checkpoint(run / "checkpoints" / "step_0000007.ckpt")["global_step"] == 7
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_divergence_under_ddp_is_one_line_too(tmp_path):
    # Every rank sees the NaN (the gradients are averaged); test_ddp_preemption: a NaN on one rank only.
    p = difflab_cli(
        "train", *RUN, "trainer=ddp_cpu", "model.optimizer.lr=1e6", "model.warmup_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "difflab: error: training diverged:" in p.stderr


def test_atomic_write_removes_its_temporary_file_and_names_a_full_disk(tmp_path, monkeypatch):
    from difflab.files import DiskFullError, atomic_write, atomic_write_text

    target = tmp_path / "cache.json"
    atomic_write_text(target, "old")
    monkeypatch.setattr(difflab.files, "open", lambda p, m: _FullDisk(p, m, room=2), raising=False)
    with pytest.raises(DiskFullError, match="no space left on device writing"):
        atomic_write_text(target, "new and longer", shared=True)
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]
    with pytest.raises(ZeroDivisionError):  # any other failure: propagated, nothing left behind
        atomic_write(target, lambda f: 1 / 0)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]
