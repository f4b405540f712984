"""FID set-up on several ranks: the classifier and the real features built once per cache dir, the real
features extracted in shards by all ranks, node-local cache dirs, and the DDP run's FID against one
process's FID of the same samples."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import hydra.utils
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from difflab.data.datamodule import ImageDataModule
from difflab.data.sources import digits_source
from difflab.metrics import fid as fid_module
from difflab.metrics.features import ClassifierFeatures
from difflab.metrics.fid import prepare_extractor, real_features
from tests.test_fid import FixedFeatures

CPU = torch.device("cpu")


class FakeWorld:
    """N ranks as threads of one process, with the collectives of a Lightning strategy: the rank logic
    runs for real without process groups (fast, and a hang fails the barrier's timeout)."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=60), [None] * size

    def rank(self, r: int) -> _FakeRank:
        return _FakeRank(self, r)


class _FakeRank:
    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.global_rank, self.world_size = world, rank, world.size

    def _exchange(self, value: object) -> list:
        w = self.world
        w.barrier.wait()
        w.slots[self.global_rank] = value
        w.barrier.wait()
        out = list(w.slots)
        w.barrier.wait()
        return out

    def broadcast(self, obj, src: int = 0):
        return self._exchange(obj)[src]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(tensor.clone()))

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        votes = self._exchange(bool(decision))
        return (False not in votes) if all else (True in votes)


def on_ranks(fn: Callable[[_FakeRank], object], size: int = 2) -> list:
    world, results, errors = FakeWorld(size), [None] * size, []

    def run(r: int) -> None:
        try:
            results[r] = fn(world.rank(r))
        except BaseException as e:
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def digits() -> ImageDataModule:
    return ImageDataModule(source=digits_source, resolution=8, channels=1)


@pytest.fixture
def shards(monkeypatch) -> list[tuple[int, int]]:
    """(start, count) of every real-feature extraction, in any rank."""
    calls, original = [], fid_module.compute_real_features

    def record(dm, ext, num, device, batch_size=256, start=0):
        calls.append((start, num))
        return original(dm, ext, num, device, batch_size, start)

    monkeypatch.setattr(fid_module, "compute_real_features", record)
    return calls


def test_real_features_sharded_over_ranks_equal_one_process(tmp_path, shards):
    """Two ranks sharing a cache dir: each extracts half (301 images: 150 + 151, padded for the
    gather), both get the one-process features in image order, and the cache is written once; a second
    set-up computes nothing."""
    ext = FixedFeatures()
    one = real_features(digits(), ext, 301, tmp_path / "one", CPU, batch_size=64)
    shards.clear()
    shared = tmp_path / "shared"
    two = on_ranks(lambda w: real_features(digits(), ext, 301, shared, CPU, 64, world=w))
    assert sorted(shards) == [(0, 150), (150, 151)]
    for feats in two:
        assert feats.shape == (301, 16)
        torch.testing.assert_close(feats, one, rtol=1e-12, atol=1e-12)
    assert len(list(shared.glob("fid_real_*.pt"))) == 1
    shards.clear()
    again = on_ranks(lambda w: real_features(digits(), ext, 301, shared, CPU, 64, world=w))
    assert shards == [] and torch.equal(again[0], again[1])


def test_node_local_cache_dirs(tmp_path, shards):
    """Two "nodes", each with its own cache dir: each gets the features (the same bytes' worth); when only
    the second node lost them, all ranks extract their shard again, the second node writes its copy and
    the first node's file is left untouched; with both present nothing is computed."""
    ext = FixedFeatures()
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    on_ranks(lambda w: real_features(digits(), ext, 200, dirs[w.global_rank], CPU, 64, world=w))
    files = [next(d.glob("fid_real_*.pt")) for d in dirs]
    assert files[0].name == files[1].name
    a, b = (torch.load(f)["features"] for f in files)
    assert torch.equal(a, b) and a.shape == (200, 16)
    stamp = files[0].stat().st_mtime_ns
    files[1].unlink()
    shards.clear()
    out = on_ranks(lambda w: real_features(digits(), ext, 200, dirs[w.global_rank], CPU, 64, world=w))
    assert sorted(shards) == [(0, 100), (100, 100)]
    assert files[1].is_file() and files[0].stat().st_mtime_ns == stamp
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], a)
    shards.clear()
    on_ranks(lambda w: real_features(digits(), ext, 200, dirs[w.global_rank], CPU, 64, world=w))
    assert shards == []


def test_classifier_trained_once_and_sent_to_a_node_without_it(tmp_path, monkeypatch):
    """Rank 0 trains the classifier; rank 1, on a "node" whose cache dir lacks it, uses rank 0's very
    file (same bytes, same identity) and caches it; it never trains one of its own."""
    trained = []
    original = ClassifierFeatures.fit
    monkeypatch.setattr(
        ClassifierFeatures, "fit", lambda self, *a, **k: trained.append(self) or original(self, *a, **k)
    )
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    exts = [ClassifierFeatures(cache_dir=str(d), epochs=1, width=8, max_train_images=300) for d in dirs]
    on_ranks(lambda w: prepare_extractor(exts[w.global_rank], digits(), CPU, w))
    assert trained == [exts[0]]
    files = [next(d.glob("classifier_*.pt")) for d in dirs]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert exts[0].identity == exts[1].identity != "classifier:unprepared"
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(exts[0](x), exts[1](x))


def test_concurrent_jobs_sharing_a_cache_dir_train_the_classifier_once(tmp_path, monkeypatch):
    """Two jobs (no common process group) start on one cache dir at once: the file lock lets one
    train, the other waits and loads its file."""
    trained = []
    original = ClassifierFeatures.fit
    monkeypatch.setattr(
        ClassifierFeatures, "fit", lambda self, *a, **k: trained.append(self) or original(self, *a, **k)
    )
    exts = [ClassifierFeatures(str(tmp_path), epochs=1, width=8, max_train_images=300) for _ in "ab"]
    start = threading.Barrier(2, timeout=60)

    def job(ext: ClassifierFeatures) -> None:
        dm = digits()
        dm.setup()
        start.wait()
        ext.prepare(dm)

    threads = [threading.Thread(target=job, args=(e,)) for e in exts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and exts[0].identity == exts[1].identity != "classifier:unprepared"


class RecordFID(L.Callback):
    """Writes every rank's logged FID values (importable by DDP workers)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/fid")}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


def test_ddp_fid_equals_one_process_fid_of_the_same_samples(tmp_path, shards):
    """``difflab-train trainer=ddp_cpu callbacks=with_fid`` on 2 ranks: the classifier and the real
    features are built once (two shards, one file each), both ranks log the same FID, and it is the
    FID ``difflab-eval`` computes in one process for the same checkpoint, samples and cache."""
    from difflab.evaluate import COMMAND
    from tests.helpers import train_cli

    run, cache = tmp_path / "run", tmp_path / "cache"
    fid = ["callbacks.fid.num_samples=30", "callbacks.fid.num_real=301", "callbacks.fid.steps=3"]
    p = train_cli(
        "experiment=digits",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "data.batch_size=32",
        "logger=none",
        "callbacks=with_fid",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "callbacks.fid.every_n_steps=1",
        *fid,
        "metrics.extractor.epochs=1",
        "metrics.extractor.max_train_images=500",
        f"metrics.cache_dir={cache}",
        "+callbacks.record._target_=tests.test_fid_ranks.RecordFID",
        f"+callbacks.record.path={tmp_path / 'fid'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(cache.glob("classifier_*.pt"))) == len(list(cache.glob("fid_real_*.pt"))) == 1
    ranks = [json.loads((tmp_path / "fid" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[0]) == ["val/fid_classifier_30"] and ranks[0] == ranks[1]
    lines = [json.loads(x) for x in (run / "fid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    rows = COMMAND.call(
        [
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "sampler=[dpmsolver++]",
            "steps=[3]",
            "num_samples=30",
            "num_real=301",
            "channels_last=false",
            "device=cpu",
            f"metrics.cache_dir={cache}",
            "metrics.extractor.epochs=1",  # the run's classifier settings: the same cached file
            "metrics.extractor.max_train_images=500",
            f"out={tmp_path / 'eval'}",
        ]
    )
    assert shards == []  # the DDP run's cache served the one-process evaluation
    assert rows[0]["extractor"] == lines[-1]["extractor"]
    # The gathered shards are the one-process features, in image order.
    data = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["difflab"]["config"]["data"]
    dm = hydra.utils.instantiate(OmegaConf.create(data))
    ext = ClassifierFeatures(str(cache), epochs=1, max_train_images=500)  # the run's: its cached file
    ext.prepare(dm)
    cached = torch.load(next(cache.glob("fid_real_*.pt")))["features"]
    torch.testing.assert_close(cached, fid_module.compute_real_features(dm, ext, 301, CPU))
    assert rows[0]["val/fid_classifier_30"] == pytest.approx(ranks[0]["val/fid_classifier_30"], rel=1e-5)


def test_cache_dir_that_cannot_be_written_is_one_line(tmp_path):
    """Each rank checks its own (maybe node-local) cache dir before any collective."""
    from types import SimpleNamespace

    from difflab.callbacks.fid import FIDCallback
    from difflab.errors import DifflabError

    (tmp_path / "file").write_text("")
    callback = FIDCallback(FixedFeatures(), cache_dir=str(tmp_path / "file" / "fid"))
    with pytest.raises(DifflabError, match=r"metrics.cache_dir=.*file/fid cannot be created: .* is a file"):
        callback.setup(SimpleNamespace(), None, "fit")


def test_classifier_training_is_a_function_of_its_seed_and_leaves_the_global_rng(tmp_path):
    """Trained on rank 0 inside the run's set-up: the file must not depend on what drew from the global
    RNG before (it did: the initial weights), and the run's RNG on rank 0 must stay as on the others."""
    blobs = []
    for ambient in (1, 2):
        torch.manual_seed(ambient)
        before = torch.get_rng_state()
        ext = ClassifierFeatures(str(tmp_path / str(ambient)), epochs=1, width=8, max_train_images=300)
        ext.prepare(digits())
        assert torch.equal(torch.get_rng_state(), before)
        blobs.append(ext.shared_state())
    assert blobs[0] == blobs[1]


def test_rank_zero_prepares_the_extractor_on_every_core(monkeypatch):
    """The other ranks only wait while rank 0 trains the classifier: it may use their cores too (DDP
    leaves each rank cores ÷ ranks threads), and gives them back after."""
    import os

    threads = []
    ext = FixedFeatures()
    monkeypatch.setattr(ext, "prepare", lambda *a, **k: threads.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        on_ranks(lambda w: prepare_extractor(ext, digits(), CPU, w))
        assert threads == [len(os.sched_getaffinity(0))] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_damaged_cache_entry_is_replaced_not_kept(tmp_path, shards):
    """Writing once per dir must not keep a damaged file (a bad copy) forever, recomputed every run."""
    ext = FixedFeatures()
    good = real_features(digits(), ext, 50, tmp_path, CPU)
    path = next(tmp_path.glob("fid_real_*.pt"))
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(real_features(digits(), ext, 50, tmp_path, CPU), good)
    shards.clear()
    assert torch.equal(real_features(digits(), ext, 50, tmp_path, CPU), good) and shards == []
