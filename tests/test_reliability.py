"""A run you can trust: kill -9 at any moment resumes exactly; NaN, corrupt files and a full disk
stop with one line and never cost a good checkpoint."""

from __future__ import annotations

import errno
import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import difflab.checkpoints as ckpts
import difflab.files
from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import FAST_DIGITS
from tests.helpers import difflab_cli, max_abs_diff

# Digits: 1,797 images / batch 64 = 28 steps an epoch. 70 steps = 2.5 epochs; a checkpoint every 7
# steps puts one exactly on the epoch boundaries (28, 56) and others inside epochs. Warm-up ends at
# step 10, so the cosine schedule (which depends on max_steps) is in force for most of the run.
RUN = (
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


def kill_then_rerun(
    run_dir: Path, args: tuple[str, ...], step: int, moment: str, rerun_with: tuple[str, ...] = ()
) -> dict:
    """Run ``args`` until KillAt SIGKILLs it at (step, moment), rerun the same command (plus
    ``rerun_with``, e.g. another worker count); the final checkpoint."""
    cmd = (*args, f"hydra.run.dir={run_dir}")
    kill = ("+callbacks.kill._target_=tests.helpers.KillAt", f"+callbacks.kill.step={step}")
    p = difflab_cli("train", *cmd, *kill, f"+callbacks.kill.moment={moment}", cwd=run_dir.parent)
    assert p.returncode == -9, f"not killed (exit {p.returncode}): {p.stderr[-2000:]}"
    p = difflab_cli("train", *cmd, *rerun_with, cwd=run_dir.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def uninterrupted(run_dir: Path, args: tuple[str, ...]) -> dict:
    p = difflab_cli("train", *args, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def assert_same_end(reference: dict, final: dict) -> None:
    assert final["global_step"] == reference["global_step"]
    diffs = max_abs_diff(reference, final)
    assert max(diffs.values()) <= 1e-6, diffs


# (kill step, moment): the end of epoch 0 right after its checkpoint; inside epoch 1, 3 steps past a
# checkpoint; epoch 2 halfway through writing a checkpoint (the resume goes back to step 56).
DEFAULT_KILLS = [(28, "after_save"), (45, "step"), (63, "during_save")]


def test_kill9_across_epochs_resumes_exactly(tmp_path):
    reference = uninterrupted(tmp_path / "straight", RUN)
    for step, moment in DEFAULT_KILLS:
        final = kill_then_rerun(tmp_path / f"kill_{step}_{moment}", RUN, step, moment)
        assert_same_end(reference, final)


def test_a_kill_during_a_write_leaves_the_previous_checkpoints_readable(tmp_path):
    run = tmp_path / "run"
    p = difflab_cli(
        "train",
        *RUN,
        f"hydra.run.dir={run}",
        "+callbacks.kill._target_=tests.helpers.KillAt",
        "+callbacks.kill.step=35",
        "+callbacks.kill.moment=during_save",
        cwd=tmp_path,
    )
    assert p.returncode == -9
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 28
    assert ckpts.find_last_checkpoint(run).name == "last.ckpt"
    assert not (run / "checkpoints" / "step_0000035.ckpt").exists()  # the half-written file is a .tmp


def _folder_of_digits(root: Path, n: int = 300) -> Path:
    root.mkdir(parents=True)
    for i, img in enumerate(load_digits().images[:n]):
        Image.fromarray((img * 255 / 16).astype("uint8")).save(root / f"{i:04d}.png")
    return root


SLOW_VARIANTS = {
    "accumulate": ("trainer.accumulate_grad_batches=2",),
    "ddp_cpu": ("trainer=ddp_cpu", "data.batch_size=32"),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*SLOW_VARIANTS, "folder_2_workers"])
def test_kill9_resumes_exactly_in_every_setting(tmp_path, variant):
    if variant == "folder_2_workers":
        # 300 files / batch 32 = 9 steps an epoch: 70 steps cross 7 epoch boundaries.
        folder = _folder_of_digits(tmp_path / "images")
        extra = (
            "data=folder",
            f"data.source.path={folder}",
            "data.resolution=8",
            "data.channels=1",
            "data.batch_size=32",
            "data.num_workers=2",
            "data.flip=true",
        )
        args = (*RUN[:1], *extra, *RUN[1:])
        args = (*(a for a in args if a != "experiment=digits"), "model/unet=tiny")
    else:
        args = (*RUN, *SLOW_VARIANTS[variant])
    reference = uninterrupted(tmp_path / "straight", args)
    for step, moment in [(30, "step"), (56, "after_save"), (63, "during_save")]:
        final = kill_then_rerun(tmp_path / f"kill_{step}_{moment}", args, step, moment)
        assert_same_end(reference, final)


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


# ------------------------------------------------------------------------------ repeated kills
def kill_chain_then_rerun(run_dir: Path, args: tuple[str, ...], kills: list[tuple[int, str]]) -> dict:
    """Kill the same command at each (step, moment) in turn, each rerun resuming from what the killed
    one wrote (a job preempted several times), then run it to the end; the final checkpoint."""
    cmd = (*args, f"hydra.run.dir={run_dir}")
    for step, moment in kills:
        kill = ("+callbacks.kill._target_=tests.helpers.KillAt", f"+callbacks.kill.step={step}")
        p = difflab_cli("train", *cmd, *kill, f"+callbacks.kill.moment={moment}", cwd=run_dir.parent)
        assert p.returncode == -9, f"not killed at {step} (exit {p.returncode}): {p.stderr[-2000:]}"
    p = difflab_cli("train", *cmd, cwd=run_dir.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def assert_identical_end(reference: dict, final: dict) -> None:
    """Bit-exact: weights, EMA, optimizer, LR schedule, loop counters and loader state."""
    assert final["global_step"] == reference["global_step"]
    assert max(max_abs_diff(reference, final).values()) == 0, max_abs_diff(reference, final)
    assert final["lr_schedulers"] == reference["lr_schedulers"]
    assert final["loops"] == reference["loops"]


# RUN: epochs end at steps 28 and 56 (14, 28, 42, 56 accumulating 2 batches). Each chain resumes at
# least twice from an epoch-end checkpoint, once from one a resumed run wrote.
CHAINS = {
    "triple": ((), [(29, "step"), (45, "step"), (57, "step")]),
    "accumulate": (("trainer.accumulate_grad_batches=2",), [(15, "step"), (29, "step"), (43, "step")]),
    "ddp_cpu": (("trainer=ddp_cpu", "data.batch_size=32"), [(29, "step"), (57, "step")]),
    "streaming": ((), [(29, "step"), (45, "step"), (57, "step")]),
    "posthoc": (("model/ema=posthoc", "model.ema.snapshot_every=5"), [(29, "step"), (57, "step")]),
    "final_save": ((), [(57, "step"), (70, "during_last_save")]),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", CHAINS)
def test_repeated_kills_resume_bit_exactly(tmp_path, variant):
    extra, kills = CHAINS[variant]
    args = (*RUN, *extra)
    if variant == "streaming":
        from difflab.prepare import COMMAND as PREPARE

        shards = tmp_path / "shards"
        PREPARE.call(["data=digits", f"out={shards}", "chunk_bytes=5KB"])
        data = ("data=streaming", f"data.source.path={shards}", "data.resolution=8", "data.channels=1")
        args = (*RUN, *data, "data.num_workers=2")
    reference = uninterrupted(tmp_path / "straight", args)
    final = kill_chain_then_rerun(tmp_path / "killed", args, kills)
    assert_identical_end(reference, final)
    if variant == "posthoc":
        ref = sorted((tmp_path / "straight" / "ema_snapshots").iterdir())
        got = sorted((tmp_path / "killed" / "ema_snapshots").iterdir())
        assert [p.read_bytes() for p in got] == [p.read_bytes() for p in ref] and len(ref) == 14
    if variant == "final_save":
        last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
        assert last.read_bytes() == (last.parent / "step_0000070.ckpt").read_bytes()
