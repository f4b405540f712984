"""Preemption, divergence and the loss window on 2 DDP ranks (trainer=ddp_cpu: gloo, Lightning's launcher),
as difflab-train runs them: a signal or a NaN on one rank only stops every rank at the same step."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from difflab.callbacks.preemption import requeue_slurm_job
from difflab.checkpoints import load_checkpoint
from tests.helpers import difflab_cli, max_abs_diff

# 1,797 digits / (2 ranks x 32) = 28 steps an epoch; no checkpoint but the last (and the signal's).
DDP = (
    "experiment=digits",
    "trainer.precision=32-true",
    "data.batch_size=32",
    "trainer.max_steps=8",
    "model.warmup_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=100",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "logger=none",
    "trainer.enable_model_summary=false",
)
TIMEOUT = 150  # a hang fails the test instead of blocking the suite


class SignalRankAt(L.Callback):
    """Sends ``sig`` to its own process on global rank ``rank`` after optimizer step ``step`` (as a
    scheduler signalling one task, or one rank reaching the moment before the others)."""

    def __init__(self, rank: int, step: int, sig: str, group: bool = False) -> None:
        self.rank, self.step, self.sig, self.group = rank, step, signal.Signals[sig], group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.group:  # as a terminal's Ctrl-C: every process of the group, the launcher's too
                os.killpg(os.getpgid(0), self.sig)
            else:
                os.kill(os.getpid(), self.sig)


class PoisonRankAt(L.Callback):
    """Makes rank ``rank``'s batch NaN at optimizer step ``step`` (from 0): its loss alone is NaN."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch.fill_(float("nan"))


class DumpLossWindow(L.Callback):
    """Writes ``rank<N>.json`` into ``dirpath``: each step's loss and the loss window's sum after it."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath, self.rows = Path(dirpath), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append([float(outputs["loss"]), float(pl_module.loss_window.loss_sum)])

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def _run(run: Path, *args: str, trainer: str = "ddp_cpu") -> subprocess.CompletedProcess:
    """``difflab-train`` on 2 ranks in a session of its own: a hang kills every rank, not rank 0."""
    return difflab_cli(
        "train", *DDP, f"trainer={trainer}", *args, f"hydra.run.dir={run}", cwd=run.parent, timeout=TIMEOUT
    )


def _signal_at(rank: int, step: int, sig: str) -> tuple[str, ...]:
    cb = "+callbacks.signal"
    return (f"{cb}._target_=tests.test_ddp_preemption.SignalRankAt", f"{cb}.rank={rank}", f"{cb}.step={step}",
            f"{cb}.sig={sig}")  # fmt: skip


def _assert_saved_and_stopped(p: subprocess.CompletedProcess, run: Path, step: int) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not list(run.rglob("hpc_ckpt*"))  # Lightning's SLURM handler did not save on its own
    assert sorted(f.name for f in (run / "checkpoints").iterdir()) == ["last.ckpt", f"step_{step:07d}.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step


# SIGTERM to one rank only (a scheduler signalling one task, or a user's kill); SIGUSR2, submitit's
# warning before the time limit (its default action would kill the rank).
@pytest.mark.parametrize(
    ("sig", "rank"), [("SIGTERM", 1), pytest.param("SIGUSR2", 0, marks=pytest.mark.slow)]
)
def test_a_signal_on_one_rank_saves_once_and_stops_every_rank(tmp_path, sig, rank):
    run = tmp_path / "run"
    # After step 2; the ranks agree every 3 steps: all save step 3 and exit 0.
    p = _run(run, *_signal_at(rank, 2, sig), "callbacks.preemption.sync_every_n_steps=3")
    _assert_saved_and_stopped(p, run, 3)


@pytest.mark.slow
def test_ctrl_c_under_ddp_spawn_saves_instead_of_ending_the_ranks(tmp_path):
    # The spawning process runs no callbacks: it outlives the first Ctrl-C while its ranks save.
    run = tmp_path / "run"
    ctrl_c = (*_signal_at(0, 2, "SIGINT"), "+callbacks.signal.group=true")
    p = _run(run, *ctrl_c, "callbacks.preemption.sync_every_n_steps=3", trainer="ddp_spawn_cpu")
    _assert_saved_and_stopped(p, run, 3)


@pytest.mark.slow  # 3 runs on 2 ranks: ~65 s
def test_a_run_stopped_by_a_signal_on_one_rank_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    assert _run(straight).returncode == 0
    run = tmp_path / "run"
    p = _run(run, *_signal_at(1, 2, "SIGTERM"), "callbacks.preemption.sync_every_n_steps=4")
    _assert_saved_and_stopped(p, run, 4)
    p = _run(run)  # the rerun resumes from last.ckpt
    assert p.returncode == 0, p.stderr[-3000:]
    final, reference = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, straight))
    assert final["global_step"] == reference["global_step"] == 8
    assert max(max_abs_diff(reference, final).values()) == 0.0


def test_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    cb = "+callbacks.poison"
    poison = (f"{cb}._target_=tests.test_ddp_preemption.PoisonRankAt", f"{cb}.rank=1", f"{cb}.step=3")
    run = tmp_path / "run"
    p = _run(run, *poison, "trainer.log_every_n_steps=4")  # the window closes after step 4
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("difflab: error:")]
    assert errors and all("training diverged: the loss became NaN/Inf at steps 1-4 " in e for e in errors), (
        errors
    )
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_each_rank_keeps_its_own_loss_window(tmp_path):
    cb = "+callbacks.dump"
    dump = (f"{cb}._target_=tests.test_ddp_preemption.DumpLossWindow", f"{cb}.dirpath={tmp_path / 'dump'}")
    # One window over the whole run (it closes only at the last step, without a reset).
    p = _run(tmp_path / "run", *dump, "trainer.max_steps=5", "trainer.log_every_n_steps=100")
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rows in ranks:
        losses = torch.tensor([loss for loss, _ in rows], dtype=torch.float64)
        window = torch.tensor([total for _, total in rows], dtype=torch.float64)
        assert torch.allclose(window, losses.cumsum(0), rtol=1e-5), rows  # its own losses, not rank 0's
    assert ranks[0] != ranks[1]  # each rank trains on its own batches and noise


def test_requeue_runs_scontrol_with_the_jobs_id(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue_slurm_job()
    assert (tmp_path / "calls").read_text().splitlines() == ["requeue 123", "requeue 120_3"]


@pytest.mark.parametrize(("sig", "requeued"), [("SIGUSR2", True), ("SIGTERM", False)])
def test_rank_0_requeues_at_the_step_boundary_only_on_a_time_limit_signal(
    tmp_path, monkeypatch, sig, requeued
):
    from types import SimpleNamespace

    from difflab.callbacks.preemption import PreemptionCallback

    calls = []
    monkeypatch.setattr("difflab.callbacks.preemption.requeue_slurm_job", lambda: calls.append(1))
    trainer = SimpleNamespace(world_size=1, global_step=0, is_global_zero=True, checkpoint_callbacks=[])
    cb = PreemptionCallback()
    cb.on_train_start(trainer, None)
    try:
        cb.on_train_batch_start(trainer, None)
        os.kill(os.getpid(), signal.Signals[sig])
        assert not calls  # the handler only notes it
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, None)
    finally:
        cb.teardown(trainer, None, "fit")
    assert trainer.should_stop and calls == ([1] if requeued else [])


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGUSR2"])
def test_only_the_time_limit_signals_ask_for_a_requeue(tmp_path, monkeypatch, sig):
    from difflab.callbacks.preemption import PreemptionCallback

    cb = PreemptionCallback()
    cb.on_train_start(None, None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert cb.requested and not cb.requeue
        os.kill(os.getpid(), signal.Signals[sig])
        assert cb.requeue
    finally:
        cb.teardown(None, None, "fit")
