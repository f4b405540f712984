"""Resume: N steps then N more equals 2N straight (same seed, CPU), to 1e-6."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import FAST_DIGITS
from tests.helpers import Crash, _TorchWithSave, max_abs_diff


def weights(path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ckpt = load_checkpoint(path)
    return [v for k, v in sorted(ckpt["state_dict"].items())], ckpt["ema"]["shadow_params"]


# 1,797 digits / batch 64 = 28 batches an epoch: 20 steps stops mid-epoch, 40 crosses the boundary.
ARGS = (
    *FAST_DIGITS,
    "data.flip=true",
    "callbacks.model_checkpoint.every_n_train_steps=20",
    "logger=csv",
    "trainer.log_every_n_steps=5",
)


def logged(run) -> list[tuple[int, str]]:
    """(step, loss) rows of the run's CSV log."""
    with open(run / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# The learned loss weighting's parameters (and their Adam moments) are part of the state that resumes;
# bf16-mixed is the default precision on CPUs with AMX (and on GPUs), with foreach AdamW under clipping.
@pytest.mark.parametrize(
    "extra",
    [(), ("model.learned_weighting=true",), ("trainer.precision=bf16-mixed",)],
    ids=["plain", "learned_weighting", "bf16"],
)
def test_resume_mid_epoch_equals_uninterrupted(make_cfg, tmp_path, extra):
    args = (*ARGS, *extra)
    train(make_cfg(*args, "trainer.max_steps=40", run_dir=tmp_path / "straight"))
    train(make_cfg(*args, "trainer.max_steps=20", run_dir=tmp_path / "split"))
    half = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(half)["global_step"] == 20
    train(make_cfg(*args, "trainer.max_steps=40", f"ckpt_path={half}", run_dir=tmp_path / "split"))

    straight = weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = weights(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 40
    assert max_diff(straight[0], resumed[0]) <= 1e-6  # live weights
    assert max_diff(straight[1], resumed[1]) <= 1e-6  # EMA weights
    # The resumed log continues the same file with the same step numbers (and the same losses).
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [s for s, _ in a] == [s for s, _ in b] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert all(abs(float(x) - float(y)) <= 1e-5 for (_, x), (_, y) in zip(a, b, strict=True))


def test_resume_inside_a_logging_window_logs_the_same_means(make_cfg, tmp_path):
    # Windows of 7 steps close at steps 6 and 13; the split at 10 leaves 3 steps of the second window
    # in the checkpoint, which the resumed run must count into the mean it logs at step 13.
    args = (*ARGS, "trainer.log_every_n_steps=7", "callbacks.model_checkpoint.every_n_train_steps=10")
    train(make_cfg(*args, "trainer.max_steps=14", run_dir=tmp_path / "straight"))
    train(make_cfg(*args, "trainer.max_steps=10", run_dir=tmp_path / "split"))
    half = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(half)["difflab"]["log_window"]["steps"] == 3
    train(make_cfg(*args, "trainer.max_steps=14", f"ckpt_path={half}", run_dir=tmp_path / "split"))
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [s for s, _ in a] == [s for s, _ in b] == [6, 13]
    assert all(abs(float(x) - float(y)) <= 1e-5 for (_, x), (_, y) in zip(a, b, strict=True))


def test_resume_with_a_different_model_names_the_keys(make_cfg, tmp_path):
    train(make_cfg(*FAST_DIGITS, "trainer.max_steps=2", run_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = make_cfg(
        *FAST_DIGITS, "model.unet.block_out_channels=[16,16]", f"ckpt_path={ckpt}", run_dir=tmp_path / "a"
    )
    with pytest.raises(
        DifflabError, match=r"model\.unet\.block_out_channels \(checkpoint \[16, 32\], config \[16, 16\]\)"
    ):
        train(cfg)


def test_missing_checkpoint_is_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(DifflabError, match="does not exist"):
        train(make_cfg(*FAST_DIGITS, f"ckpt_path={tmp_path}/nope.ckpt"))


# ------------------------------------------------------------------------------ repeated crashes
# 512 digits / batch 64 = 8 steps an epoch; a checkpoint every 4 steps puts one on each epoch end (8, 16).
# Warm-up ends at step 3, so the cosine schedule is in force for most of the 20 steps.
CHAIN = (
    *FAST_DIGITS,
    "seed=7",
    "data.source.max_items=512",
    "data.flip=true",
    "trainer.max_steps=20",
    "model.warmup_steps=3",
    "callbacks.model_checkpoint.every_n_train_steps=4",
)


def crashed_and_resumed(make_cfg, run, args: tuple[str, ...], crashes: list[int]) -> dict:
    """Train ``args`` in ``run``, crashing at each of ``crashes`` in turn (each rerun resumes from what
    the last one left, ckpt_path=last), then to the end; the final ``last.ckpt``."""
    for step in crashes:
        crash = ("+callbacks.crash._target_=tests.helpers.CrashAt", f"+callbacks.crash.step={step}")
        with pytest.raises(Crash):
            train(make_cfg(*args, *crash, run_dir=run))
    train(make_cfg(*args, run_dir=run))
    return load_checkpoint(run / "checkpoints" / "last.ckpt")


def assert_identical(reference: dict, final: dict) -> None:
    """Bit-exact: weights, EMA, optimizer, LR schedule, Lightning's loop counters and the loader state."""
    assert final["global_step"] == reference["global_step"]
    assert max(max_abs_diff(reference, final).values()) == 0, max_abs_diff(reference, final)
    assert final["lr_schedulers"] == reference["lr_schedulers"]
    assert final["loops"] == reference["loops"]  # epoch progress and data-loader position included


@pytest.fixture(scope="module")
def chain_straight(trained_runs) -> Path:
    """The checkpoints of CHAIN run without interruption."""
    return trained_runs(*CHAIN) / "checkpoints"


def test_two_resumes_at_epoch_ends_equal_uninterrupted(make_cfg, tmp_path, chain_straight):
    # Crashed after step 9: resumed from step 8, an epoch end; crashed after 17: resumed from step 16,
    # an epoch end the resumed run wrote. Lightning's epoch counters were one behind in that file, and
    # the second resume replayed epoch 1 (its data and noise).
    final = crashed_and_resumed(make_cfg, tmp_path / "run", CHAIN, [9, 17])
    assert_identical(load_checkpoint(chain_straight / "last.ckpt"), final)
    resumed_epoch_end = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000016.ckpt")
    assert resumed_epoch_end["loops"] == load_checkpoint(chain_straight / "step_0000016.ckpt")["loops"]


def test_old_off_by_one_epoch_counters_resume_exactly(make_cfg, tmp_path, chain_straight):
    # What difflab wrote at step 16 after a resume from step 8, before the fix: epoch 1 counted as
    # not started. A job preempted across the upgrade resumes from such a file.
    old = torch.load(chain_straight / "step_0000016.ckpt", weights_only=True)
    for counts in old["loops"]["fit_loop"]["epoch_progress"].values():
        counts.update(ready=1, started=1, processed=1, completed=1)
    torch.save(old, tmp_path / "old.ckpt")
    train(make_cfg(*CHAIN, f"ckpt_path={tmp_path / 'old.ckpt'}", run_dir=tmp_path / "run"))
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_identical(load_checkpoint(chain_straight / "last.ckpt"), final)


def test_a_resume_under_accumulation_does_not_rewrite_its_checkpoint(make_cfg, tmp_path):
    # Accumulating 2 batches: 4 steps an epoch, step 4 ends one. The rerun resumed from step 4 used to
    # rewrite step_0000004.ckpt and last.ckpt after its first micro-batch (a batch counted as done
    # whose gradient no file holds); crashed before step 5, the next rerun lost that batch.
    args = (*CHAIN, "trainer.accumulate_grad_batches=2", "trainer.max_steps=6")
    train(make_cfg(*args, run_dir=tmp_path / "straight"))
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    final = crashed_and_resumed(make_cfg, tmp_path / "run", args, [5, 5])
    assert_identical(reference, final)


def test_a_crash_while_writing_the_final_last_ckpt_is_repaired_by_the_rerun(make_cfg, tmp_path, monkeypatch):
    import difflab.checkpoints as ckpts

    args = (*CHAIN, "trainer.max_steps=10")
    real_save = torch.save

    def fail_on_final_last(obj, f, *a, **k):
        if obj["global_step"] == 10 and f.f.name.endswith(".last.ckpt.tmp"):
            f.write(b"half a checkpoint")
            raise Crash("crash while writing last.ckpt")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpts, "torch", _TorchWithSave(fail_on_final_last))
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_cfg(*args, run_dir=run))
    monkeypatch.undo()
    last, final_step = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step_0000010.ckpt"
    assert load_checkpoint(last)["global_step"] == 8 and load_checkpoint(final_step)["global_step"] == 10
    train(make_cfg(*args, run_dir=run))  # max_steps is reached: nothing to train, last.ckpt repaired
    assert last.read_bytes() == final_step.read_bytes()


def test_save_top_k_holds_after_a_crash_between_a_save_and_its_deletion(make_cfg, tmp_path, monkeypatch):
    # save_top_k=2: writing step 12 replaces step 4; a crash after the write and before the deletion
    # left step 4 for good, and the rerun (resumed from step_0000012.ckpt) never deleted that file
    # either, as Lightning keeps the checkpoint a run resumed from.
    from difflab.checkpoints import AtomicCheckpointIO

    real_remove = AtomicCheckpointIO.remove_checkpoint

    def crash_at_step_12(self, path):
        if path.endswith("step_0000004.ckpt"):
            raise Crash("crash before deleting step 4")
        real_remove(self, path)

    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", crash_at_step_12)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_cfg(*CHAIN, "callbacks.model_checkpoint.save_top_k=2", run_dir=run))
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0000004.ckpt",
        "step_0000008.ckpt",
        "step_0000012.ckpt",
    ]
    train(make_cfg(*CHAIN, "callbacks.model_checkpoint.save_top_k=2", run_dir=run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000016.ckpt",
        "step_0000020.ckpt",
    ]
