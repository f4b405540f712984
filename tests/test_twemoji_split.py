"""Twemoji's fixed held-out split: the FID reference that its label-free classifier never learnt."""

from __future__ import annotations

import torch

from difflab.data.sources import TWEMOJI_TEST_PERCENT, twemoji_source, twemoji_split
from difflab.train import train
from tests.conftest import FAST_DIGITS, compose_config


def test_twemoji_splits_are_disjoint_fixed_and_about_fifteen_percent():
    """Every emoji is on one side, by its file name alone (the same on any machine or release)."""
    test, train_split = twemoji_source("test"), twemoji_source("train")
    names = {f.name for f in test.files}
    assert not names & {f.name for f in train_split.files}
    total = len(test) + len(train_split)
    assert total == 4009 and 0.10 < len(test) / total < 0.20 and TWEMOJI_TEST_PERCENT == 15
    assert all(twemoji_split(f) == "test" for f in test.files)
    assert test.identity != train_split.identity
    assert [f.name for f in twemoji_source("test", max_items=5).files] == [f.name for f in test.files[:5]]


def test_eval_on_twemoji_uses_the_held_out_split_and_a_classifier_of_the_training_split(tmp_path):
    """difflab-eval real_split=test on a twemoji run: the reference is the 612 held-out emoji, and the
    label-free classifier is trained on the run's training split only (its file records the key)."""
    from difflab.evaluate import COMMAND

    run = tmp_path / "run"
    small = ["data=twemoji", "data.source.max_items=64", "data.resolution=8", "trainer.max_steps=2"]
    train(compose_config(run, [*FAST_DIGITS, *small, "metrics.extractor.epochs=2"]))
    cache = tmp_path / "cache"
    common = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "steps=2", "num_samples=20", "batch_size=20"]
    common += [f"metrics.cache_dir={cache}", "metrics.extractor.epochs=2", "num_real=1000"]
    row = COMMAND.call([*common, "real_split=test", f"out={tmp_path / 'eval'}"])[0]
    assert row["num_real"] == len(twemoji_source("test")) == 612
    assert "val/kid_classifier_20" in row and "val/kid_classifier_20_std" in row  # kid=auto: 20 < 10,000
    (classifier,) = cache.glob("classifier_*.pt")
    key = torch.load(classifier, weights_only=True)["key"]
    assert twemoji_source("train", max_items=64).identity in key and '"labels": "instance"' in key
    (reference,) = cache.glob("fid_real_*.json")
    assert twemoji_source("test").identity in reference.read_text()
