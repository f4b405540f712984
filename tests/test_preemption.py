"""Killed or preempted runs resume to the uninterrupted run's end: kill -9 at any moment (mid-step, after
and during a checkpoint write, across epochs, repeatedly, under accumulation, DDP, streaming shards,
post-hoc EMA), SIGTERM and Ctrl-C; and the atomic checkpoint writes that make it so. (Under DDP with a
signal on one rank: test_ddp_preemption.py; prepare killed mid-write: test_streaming.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from difflab.callbacks.preemption import PreemptionCallback
from difflab.checkpoints import AtomicCheckpointIO, find_last_checkpoint, load_checkpoint
from tests.conftest import DIGITS_70 as RUN
from tests.conftest import streaming_run
from tests.helpers import CliProcess, difflab_cli, max_abs_diff, train_cli


def test_atomic_checkpoint_write_never_corrupts(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact


def _wait_for(path: Path, proc: CliProcess, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.output()[1][-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def final_weights(run: Path) -> list[torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    return [v for _, v in sorted(ckpt["state_dict"].items())] + list(ckpt["ema"]["shadow_params"])


ARGS = (
    "experiment=digits",
    "trainer.max_steps=60",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "callbacks.sample_grid=null",
    "data.flip=true",
    "trainer.log_every_n_steps=5",
)


@pytest.mark.parametrize(
    "sig",
    # SIGKILL: test_kill9_across_epochs_resumes_exactly below covers it in the default suite.
    [pytest.param(signal.SIGKILL, marks=pytest.mark.slow), signal.SIGTERM, signal.SIGINT],
    ids=lambda s: s.name,
)
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, sig):
    straight = tmp_path / "straight"
    assert train_cli(*ARGS, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run = tmp_path / "killed"
    proc = CliProcess("train", *ARGS, f"hydra.run.dir={run}", cwd=tmp_path)
    _wait_for(run / "checkpoints" / "step_0000010.ckpt", proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    # SIGKILL may land between the step checkpoint and last.ckpt: resume takes the newest either way.
    step = load_checkpoint(find_last_checkpoint(run))["global_step"]
    if sig in (signal.SIGTERM, signal.SIGINT):
        assert code == 0 and 10 <= step < 60  # saved at the next step boundary, exited cleanly
    else:
        assert code == -9 and step < 60
    p = train_cli(*ARGS, f"hydra.run.dir={run}", cwd=tmp_path)  # ckpt_path=last by default
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 60
    for a, b in zip(final_weights(straight), final_weights(run), strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_ctrl_c_asks_for_a_save_and_a_second_one_stops_at_once():
    # The first press takes SIGTERM's path (the subprocess test above: saved, exit 0); the second
    # raises KeyboardInterrupt, which Lightning turns into an immediate exit (status 1), no save.
    # Python's own SIGINT handler, as in a terminal: a suite launched in the background (nohup, `&`)
    # inherits SIGINT ignored, and the callback must hand back whatever it found.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    cb = PreemptionCallback()
    cb.on_train_start(None, None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python runs a handler between bytecodes of the main thread
        assert cb.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        cb.teardown(None, None, "fit")
        restored = signal.signal(signal.SIGINT, inherited)
    assert restored is signal.default_int_handler


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
    assert find_last_checkpoint(run).name == "last.ckpt"
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
def test_repeated_kills_resume_bit_exactly(tmp_path, variant, request):
    extra, kills = CHAINS[variant]
    args = (*RUN, *extra)
    if variant == "streaming":
        args = streaming_run(request.getfixturevalue("digit_shards"), "data.num_workers=2")
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


def test_kill9_gives_the_snapshots_of_an_uninterrupted_run(tmp_path):
    args = (*RUN, "model/ema=posthoc", "model.ema.snapshot_every=5")
    uninterrupted(tmp_path / "straight", args)
    kill_then_rerun(tmp_path / "killed", args, 33, "step")
    ref = sorted((tmp_path / "straight" / "ema_snapshots").iterdir())
    got = sorted((tmp_path / "killed" / "ema_snapshots").iterdir())
    assert [p.name for p in got] == [p.name for p in ref] and len(ref) == 14
    for a, b in zip(ref, got, strict=True):  # byte-identical: tensors, header order, metadata
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.parametrize(
    "workers,resumed_with",
    [(0, 2), pytest.param(2, 2, marks=pytest.mark.slow), pytest.param(2, 1, marks=pytest.mark.slow)],
)
def test_kill9_mid_epoch_resumes_exactly_from_shards(tmp_path, digit_shards, workers, resumed_with):
    """Killed 3 steps past the checkpoint of step 42 in epoch 1 and resumed with data.num_workers
    changed (the order does not depend on it): the resume crosses into epoch 2 and ends identical."""
    args = streaming_run(digit_shards, f"data.num_workers={workers}")
    reference = uninterrupted(tmp_path / "straight", args)
    rerun = (f"data.num_workers={resumed_with}",)
    final = kill_then_rerun(tmp_path / "kill_45", args, 45, "step", rerun_with=rerun)
    assert_same_end(reference, final)


def test_kill9_resumes_a_meanflow_run_exactly(tmp_path):
    """MeanFlow's second noise level (r) and its r = t choice come from the step's seeded generator
    too: a resume redraws them. Killed at step 24, it resumes from step 21 across the epoch end (28)."""
    args = (*RUN, "model=meanflow", "trainer.max_steps=35")
    reference = uninterrupted(tmp_path / "straight", args)
    final = kill_then_rerun(tmp_path / "killed", args, 24, "step")
    assert_same_end(reference, final)
