"""callbacks/divergence.py: the guard is always on (callbacks=none too) and stops a NaN run before any
other callback samples it or a checkpoint saves it."""

from __future__ import annotations

import pytest

from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import FAST_DIGITS


def test_the_guard_stops_a_nan_run_even_with_callbacks_none(make_cfg, tmp_path):
    fast = [o for o in FAST_DIGITS if not o.startswith("callbacks.")]  # none of them exists under none
    cfg = make_cfg(*fast, "callbacks=none", "model.optimizer.lr=1e30", "trainer.max_steps=3")
    with pytest.raises(DifflabError, match=r"^training diverged: the loss became NaN/Inf at steps? "):
        train(cfg)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
