"""FID: the numbers themselves, the real-statistics cache, ranks, and the training callback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDPMScheduler
from torch import nn

from difflab.data.datamodule import ImageDataModule
from difflab.data.sources import digits_source
from difflab.diffusion.sampling import build_sampler
from difflab.errors import DifflabError
from difflab.files import DiskFullError
from difflab.metrics import fid as fid_module
from difflab.metrics.fid import FIDEvaluator, RealFeatureCache, metric_name, real_features
from difflab.train import train
from tests.conftest import FAST_DIGITS
from tests.test_sampling import tiny_unet


class FixedFeatures(nn.Module):
    """A fixed random conv net: a cheap, deterministic extractor for tests."""

    name = "fixed"
    identity = "fixed-random-conv:0"
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.zero_()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x * 2 - 1)).mean(dim=(2, 3)).double()

    def prepare(self, datamodule, train_if_missing=True, device=None) -> None:
        pass

    def shared_state(self) -> None:
        return None

    def adopt(self, state, datamodule) -> None:
        pass


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    ev = FIDEvaluator(FixedFeatures(), num_samples=len(fake))
    ev.set_real_features(real)
    ev.fid.fake_features_sum += fake.sum(0)
    ev.fid.fake_features_cov_sum += fake.t().mm(fake)
    ev.fid.fake_features_num_samples += len(fake)
    ev.fid.orig_dtype = torch.float64
    return float(ev.fid.compute())


def test_fid_values_against_scipy():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    assert abs(fid_from_features(real, real)) < 1e-6
    fake = real[torch.randperm(500, generator=g)][:400] + 0.5
    ours, ref = fid_from_features(real, fake), scipy_fid(real.numpy(), fake.numpy())
    assert ours == pytest.approx(ref, rel=1e-3)
    further = fid_from_features(real, fake + 1.0)
    assert further > ours > 1.0


def test_metric_names_say_extractor_and_count():
    assert metric_name("classifier", 1000) == "val/fid_classifier_1k"
    assert metric_name("inception", 2500, "kid") == "val/kid_inception_2500"


def test_real_statistics_are_cached_and_keyed_by_dataset(tmp_path, monkeypatch):
    calls = []
    original = fid_module.compute_real_features
    monkeypatch.setattr(
        fid_module, "compute_real_features", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    ext = FixedFeatures()
    dm = ImageDataModule(source=digits_source, resolution=8, channels=1)
    f1 = real_features(dm, ext, 300, tmp_path, torch.device("cpu"))
    f2 = real_features(
        ImageDataModule(source=digits_source, resolution=8, channels=1),
        ext,
        300,
        tmp_path,
        torch.device("cpu"),
    )
    assert len(calls) == 1 and torch.equal(f1, f2) and f1.shape == (300, 16)
    smaller = ImageDataModule(source=lambda: digits_source(max_items=1000), resolution=8, channels=1)
    f3 = real_features(smaller, ext, 300, tmp_path, torch.device("cpu"))
    assert len(calls) == 2  # a changed dataset never reuses the stale cache
    other_res = ImageDataModule(source=digits_source, resolution=16, channels=1)
    real_features(other_res, ext, 300, tmp_path, torch.device("cpu"))
    assert len(calls) == 3
    assert torch.equal(f1, f3)  # same first 300 images, recomputed all the same
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["extractor"] == "fixed-random-conv:0" and meta["num_real"] == 300


def _fid_for(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dm = ImageDataModule(source=digits_source, resolution=8, channels=1)
    ext = FixedFeatures()
    feats = torch.cat([ext(b) for b in dm.real_images(400)])
    ev = FIDEvaluator(ext, num_samples=24, kid=True, kid_subset_size=12)
    ev.set_real_features(feats, rank=rank, world_size=world)
    value = ev.evaluate(
        tiny_unet(), build_sampler("ddim", dict(DDPMScheduler().config)), 3, seed=5, batch_size=5
    )
    if rank == 0:
        torch.save(value, out)
    if world > 1:
        dist.destroy_process_group()


def test_nan_samples_are_one_line_not_a_crash_in_the_square_root():
    g = torch.Generator().manual_seed(0)
    ev = FIDEvaluator(FixedFeatures(), num_samples=8)
    ev.set_real_features(torch.randn(40, 16, generator=g, dtype=torch.float64))
    unet = tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(float("nan"))
    with pytest.raises(DifflabError, match=r"^FID: the sampled images hold NaN/Inf"):
        ev.evaluate(unet, build_sampler("ddim", dict(DDPMScheduler().config)), 2, seed=0, batch_size=8)


def test_kid_with_fewer_real_images_than_its_subset_size():
    """num_real=100 with num_samples=200 failed after all the sampling: torchmetrics refuses a KID
    subset larger than the real set."""
    g = torch.Generator().manual_seed(0)
    ev = FIDEvaluator(FixedFeatures(), num_samples=20, kid=True)
    ev.set_real_features(torch.randn(10, 16, generator=g, dtype=torch.float64))
    value = ev.evaluate(
        tiny_unet(), build_sampler("ddim", dict(DDPMScheduler().config)), 2, seed=0, batch_size=20
    )
    assert np.isfinite(value["val/kid_fixed_20"]) and ev.kid.subset_size == 5  # half the real set


def test_two_processes_give_the_one_process_fid(tmp_path):
    _fid_for(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(_fid_for, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert list(one) == list(two) == ["val/fid_fixed_24", "val/kid_fixed_24", "val/kid_fixed_24_std"]
    assert two["val/fid_fixed_24"] == pytest.approx(one["val/fid_fixed_24"], rel=1e-6)
    # KID draws random subsets, so only its presence and sanity are compared across rank counts.
    assert all(np.isfinite(v) for v in (*one.values(), *two.values()))


def test_training_with_fid_logs_and_keeps_best_checkpoint(make_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(
        *FAST_DIGITS,
        "callbacks=with_fid",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "trainer.max_steps=20",
        "callbacks.fid.every_n_steps=10",
        "callbacks.fid.num_samples=64",
        "callbacks.fid.num_real=500",
        "callbacks.fid.steps=4",
        "callbacks.fid.kid=true",
        "metrics.extractor.epochs=1",
        "optimized_metric=val/fid_classifier_64",
        run_dir=run,
    )
    value = train(cfg)
    lines = [json.loads(x) for x in (run / "fid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    assert all(r["extractor"].startswith("classifier:") and r["num_samples"] == 64 for r in lines)
    assert value == pytest.approx(lines[-1]["val/fid_classifier_64"], rel=1e-6)
    assert all(r["val/fid_classifier_64"] > 0 and "val/kid_classifier_64" in r for r in lines)
    best = list((run / "checkpoints").glob("best_fid_*.ckpt"))
    assert len(best) == 1
    best_step = min(lines, key=lambda r: r["val/fid_classifier_64"])["step"]
    assert best[0].name == f"best_fid_{best_step:07d}.ckpt"
    # A second run reuses the cached classifier and real features.
    cache = sorted(p.name for p in (tmp_path / "data_cache" / "fid").iterdir())
    assert any(n.startswith("classifier_") for n in cache) and any(n.startswith("fid_real_") for n in cache)


def test_inception_weights_missing_is_one_clear_error(tmp_path):
    from difflab.errors import DifflabError
    from difflab.metrics.features import InceptionFeatures

    with pytest.raises(
        DifflabError, match=r"FID Inception weights not found at .*nope\.pth.*download https://"
    ):
        InceptionFeatures(weights_path=str(tmp_path / "nope.pth"))


def test_label_free_classifier_tells_images_apart(tmp_path):
    """labels=auto on data without labels trains one class per image under shifts and flips: a shifted,
    mirrored copy of an emoji is nearest to its own original among 64; dataset labels are refused."""
    from difflab.data.datamodule import ImageDataModule
    from difflab.data.sources import twemoji_source
    from difflab.errors import DifflabError
    from difflab.metrics.features import ClassifierFeatures, shift_and_flip

    dm = ImageDataModule(source=lambda: twemoji_source(max_items=64), resolution=16, channels=3, batch_size=8)
    extractor = ClassifierFeatures(cache_dir=str(tmp_path), epochs=60, width=16, num_features=64)
    extractor.prepare(dm)
    assert extractor.label_kind(dm) == "instance"
    assert (tmp_path / extractor.file_for(dm.identity, "instance").name).is_file()
    images = torch.cat(list(dm.real_images(64)))
    moved = shift_and_flip(images, torch.Generator().manual_seed(7))
    assert not torch.equal(moved, images)
    a, b = extractor(images), extractor(moved)
    nearest = torch.cdist(b, a).argmin(1)
    assert (nearest == torch.arange(64)).float().mean() > 0.8  # chance: 1/64

    with pytest.raises(DifflabError, match=r"needs class labels.*labels=instance"):
        ClassifierFeatures(cache_dir=str(tmp_path / "other"), labels="dataset").prepare(dm)


def test_fid_cache_on_a_full_disk_is_one_line_naming_the_key(tmp_path, monkeypatch):
    import difflab.metrics.fid as fid

    def full(path, write, shared=False, sync=True):
        raise DiskFullError(Path(path))

    monkeypatch.setattr(fid, "atomic_write", full)
    with pytest.raises(fid.DifflabError) as e:
        RealFeatureCache(tmp_path / "fid").save("k", torch.zeros(2, 3), {})
    assert str(e.value) == (
        f"cannot write the FID real-feature cache in {tmp_path / 'fid'} (no space left on device); free "
        "space there or move the cache with metrics.cache_dir=<dir> (checkpoints are untouched)"
    )


def test_damaged_fid_cache_is_recomputed(tmp_path, caplog):
    cache = RealFeatureCache(tmp_path)
    cache.save("k", torch.ones(2, 3), {})
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:100])  # damaged by a copy, not by difflab
    with caplog.at_level(logging.WARNING):
        assert cache.load("k") is None
    assert "cannot be read" in caplog.text
