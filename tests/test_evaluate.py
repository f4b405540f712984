"""difflab-eval: FID (and KID) per sampler and step count in one table, its reference from the training
or a held-out split, the finished rows kept under Ctrl-C. (Its one-line refusals: the table in
test_bad_inference_inputs.py; FID itself: test_fid*.py; post-hoc EMA lengths: test_posthoc.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from difflab.errors import DifflabError
from difflab.evaluate import COMMAND
from difflab.train import train
from tests.conftest import FAST_DIGITS, compose_config


def test_eval_command_writes_table_and_plot(ckpts, tmp_path):
    import csv

    out = tmp_path / "eval"
    rows = COMMAND.call(
        [
            f"ckpt={ckpts['flow']}",
            "sampler=[unipc,dpmsolver++]",
            "steps=[2,4]",
            "num_samples=40",
            "num_real=300",
            "batch_size=20",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            f"out={out}",
        ]
    )
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("unipc", 2),
        ("unipc", 4),
        ("dpmsolver++", 2),
        ("dpmsolver++", 4),
    ]
    assert all(r["val/fid_classifier_40"] > 0 and r["extractor"].startswith("classifier:") for r in rows)
    assert json.loads((out / "results.json").read_text()) == rows
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / "fid_vs_steps.png").stat().st_size > 1000
    with pytest.raises(DifflabError, match=r"sampler=.*warp.* is not valid"):
        COMMAND.call([f"ckpt={ckpts['flow']}", "sampler=[ddim,warp]"])


def test_eval_reference_can_be_the_held_out_split(ckpts, tmp_path):
    """real_split=test: the reference statistics come from the test images (their own cache entry), the
    classifier still from the training images; a source without splits is one line naming the key."""
    run = tmp_path / "run"
    small = ["data=fashion_mnist", "data.source.max_items=256", "data.resolution=8", "trainer.max_steps=4"]
    train(compose_config(run, [*FAST_DIGITS, *small]))
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"ckpt={ckpt}", "steps=2", "num_samples=40", "num_real=300", "batch_size=40"]
    common += [f"metrics.cache_dir={tmp_path / 'cache'}"]
    rows = {
        split: COMMAND.call([*common, f"real_split={split}", f"out={tmp_path / str(split)}"])[0]
        for split in ("null", "test")
    }
    # 256 training images (the run's max_items), 300 held-out ones (the whole split is open to it).
    assert (rows["null"]["num_real"], rows["test"]["num_real"]) == (256, 300)
    assert rows["null"]["extractor"] == rows["test"]["extractor"]  # one classifier
    classifiers = list((tmp_path / "cache").glob("classifier_*.pt"))
    assert len(classifiers) == 1 and torch.load(classifiers[0])["num_classes"] == 10  # the labels, auto
    assert rows["null"]["val/fid_classifier_40"] != rows["test"]["val/fid_classifier_40"]
    assert len(list((tmp_path / "cache").glob("fid_real_*.pt"))) == 2

    with pytest.raises(DifflabError, match=r"real_split=test: .* has no splits"):
        COMMAND.call([f"ckpt={ckpts['flow']}", "real_split=test", "num_real=10"])  # digits: no splits


def test_ctrl_c_mid_eval_keeps_the_finished_rows(ckpts, tmp_path, monkeypatch, capsys):
    """The table was written at the end only: Ctrl-C after hours of FIDs kept none of them."""
    import json

    import difflab.evaluate
    from difflab.metrics.features import ClassifierFeatures

    calls = []

    def one_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"val/fid_classifier_2": 1.0}

    monkeypatch.setattr(ClassifierFeatures, "prepare", lambda self, dm: None)
    monkeypatch.setattr(
        difflab.evaluate, "real_features", lambda dm, ext, *a: torch.zeros(4, ext.num_features)
    )
    monkeypatch.setattr(difflab.evaluate.FIDEvaluator, "evaluate", one_then_ctrl_c)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        COMMAND.main([f"ckpt={ckpts['flow']}", "steps=[1,2]", "num_samples=2", f"out={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"difflab: error: interrupted; what was written so far is in {out}"
    assert [row["steps"] for row in json.loads((out / "results.json").read_text())] == [1]


def test_real_split_the_source_lacks_is_one_line_before_any_data_is_read():
    from difflab.errors import DifflabError
    from difflab.evaluate import split_config

    data = {"source": {"_target_": "difflab.data.sources.fashion_mnist_source", "split": "train"}}
    with pytest.raises(DifflabError) as e:
        split_config(data, "validation", "r.ckpt")
    assert str(e.value) == (
        "real_split=validation is not valid; allowed: train, test (the splits of r.ckpt's data source)"
    )
    assert split_config(data, "test", "r.ckpt").source.split == "test"
