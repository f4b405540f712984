"""Resume: N steps then N more equals 2N straight (same seed, CPU), to 1e-6."""

from __future__ import annotations

import csv

import pytest
import torch

from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import FAST_DIGITS


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
