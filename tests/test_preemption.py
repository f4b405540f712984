"""Atomic checkpoint writes, and killed or preempted runs resuming to the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from difflab.callbacks.preemption import PreemptionCallback
from difflab.checkpoints import AtomicCheckpointIO, find_last_checkpoint, load_checkpoint
from tests.helpers import CliProcess, train_cli


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
    # SIGKILL: test_reliability.py's kill -9 test covers it in the default suite.
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
