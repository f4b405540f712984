"""The FID classifier's cache file: named by the data and every setting that changes the network."""

from __future__ import annotations

import pytest
import torch

from difflab.data.datamodule import ImageDataModule
from difflab.data.sources import digits_source
from difflab.metrics import features
from difflab.metrics.features import ClassifierFeatures

FAST = {"epochs": 1, "width": 8, "num_features": 16, "max_train_images": 200, "seed": 0}


def digits(max_items: int | None = None) -> ImageDataModule:
    return ImageDataModule(source=lambda: digits_source(max_items), resolution=8, channels=1)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"epochs": 2},
        {"width": 16},
        {"num_features": 24},
        {"max_train_images": 150},
        {"labels": "instance"},
        {"version": 999},
        {"data": 300},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changing_a_classifier_setting_trains_a_new_classifier(tmp_path, monkeypatch, change):
    """Each setting (and the code version, and the data) gives another file, which is trained, not
    reused: the old classifier is no longer handed back for `metrics.extractor.seed=1` and the like."""
    dm = digits()
    base = ClassifierFeatures(str(tmp_path), **FAST)
    base.prepare(dm)
    files = set(tmp_path.glob("classifier_*.pt"))
    assert len(files) == 1

    key, value = next(iter(change.items()))
    if key == "version":
        monkeypatch.setattr(features, "CLASSIFIER_VERSION", value)
    settings = {**FAST, **({key: value} if key in FAST or key == "labels" else {})}
    other = ClassifierFeatures(str(tmp_path), **settings)
    other_dm = digits(value) if key == "data" else dm
    other.prepare(other_dm)
    new = set(tmp_path.glob("classifier_*.pt")) - files
    assert len(new) == 1  # trained and cached beside the first
    assert other.identity != base.identity
    kind = other.label_kind(other_dm)
    assert new == {other.file_for(other_dm.identity, kind)}
    assert torch.load(next(iter(new)), weights_only=True)["key"] == other.cache_key(other_dm.identity, kind)


def test_the_same_settings_reuse_the_cached_classifier(tmp_path, monkeypatch):
    """epochs=null and the default it resolves to are one setting; nothing is trained the second time."""
    dm = digits()
    first = ClassifierFeatures(str(tmp_path), **{**FAST, "epochs": None})
    first.prepare(dm)
    assert first.settings("dataset")["epochs"] == features.DEFAULT_EPOCHS["dataset"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not trained again")

    monkeypatch.setattr(ClassifierFeatures, "fit", no_training)
    again = ClassifierFeatures(str(tmp_path), **{**FAST, "epochs": features.DEFAULT_EPOCHS["dataset"]})
    again.prepare(dm)
    assert again.identity == first.identity
    assert len(list(tmp_path.glob("classifier_*.pt"))) == 1


def test_an_explicit_path_is_used_as_it_is(tmp_path):
    """`path:` names the file whatever the settings: a classifier kept by hand is never retrained."""
    dm = digits()
    trained = ClassifierFeatures(str(tmp_path / "a"), **FAST)
    trained.prepare(dm)
    (source,) = (tmp_path / "a").glob("classifier_*.pt")
    given = ClassifierFeatures(str(tmp_path / "b"), path=str(source), **{**FAST, "seed": 5, "epochs": 9})
    assert given.file_for(dm.identity, "dataset") == source
    given.prepare(dm)
    assert given.identity == trained.identity and not (tmp_path / "b").exists()
