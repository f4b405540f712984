"""FID (and KID) of generated images against a dataset, distributed over ranks, with cached real features.

torchmetrics holds the statistics and syncs them across ranks in ``compute()``. Real features are
computed once per (dataset identity, transform, extractor, number of images), each rank extracting a
shard on its own device, cached on disk, and split into disjoint slices over the ranks, so the
cross-rank sync counts each exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from difflab.diffusion.sampling import sample_images
from difflab.errors import DifflabError
from difflab.files import DiskFullError, atomic_write, atomic_write_text, file_lock
from difflab.rules import AtLeast

log = logging.getLogger(__name__)
T = TypeVar("T")


class World(Protocol):
    """The collectives the FID set-up needs; a Lightning ``Strategy`` is one (tests use a fake)."""

    global_rank: int
    world_size: int

    def broadcast(self, obj: T, src: int = 0) -> T: ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool: ...


def count_label(n: int) -> str:
    """1000 → '1k', 2500 → '2500': the sample count as it appears in metric names."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# Below this many samples FID's bias (it grows as 1/n, and differs between feature spaces) can decide a
# comparison; KID is unbiased at any n, so it is reported beside FID there (Bińkowski et al. 2018).
KID_BELOW = 10_000


def kid_wanted(kid: bool | str, num_samples: int) -> bool:
    """``kid`` as given, or for ``"auto"``: on when ``num_samples`` < KID_BELOW."""
    return num_samples < KID_BELOW if kid == "auto" else bool(kid)


def kid_subset_size_for(wanted: int, available: int) -> int:
    """KID's subset size for ``available`` features: at most half of them, since with all of them in
    every subset the subsets would not differ and KID's std over subsets would say nothing."""
    return max(2, min(wanted, available // 2))


def metric_name(extractor_name: str, num_samples: int, kind: str = "fid") -> str:
    """`val/fid_classifier_1k`: a FID name always says its extractor and its sample count."""
    return f"val/{kind}_{extractor_name}_{count_label(num_samples)}"


def metric_name_for(extractor_target: str, num_samples: int) -> str:
    """The logged FID key for an extractor's ``_target_`` (the ``difflab_fid_name`` resolver: monitors
    and sweeps name the metric before the extractor exists)."""
    import hydra.utils

    return metric_name(hydra.utils.get_class(extractor_target).name, int(num_samples))


@torch.no_grad()
def extract_features(
    extractor: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> torch.Tensor:
    feats = [extractor(b.to(device)).double().cpu() for b in batches]
    return torch.cat(feats)


class RealFeatureCache:
    """Real-image features on disk, keyed by everything that determines them."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)

    @staticmethod
    def key(data_identity: str, extractor_identity: str, num_real: int) -> str:
        text = f"{data_identity}|{extractor_identity}|n={num_real}"
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def path(self, key: str) -> Path:
        return self.dir / f"fid_real_{key}.pt"

    def load(self, key: str, warn: bool = True) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)["features"]
        except Exception as e:  # damaged outside difflab's atomic writer (a copy, a disk): never trusted
            if warn:
                log.warning("the FID real-feature cache %s cannot be read (%s); computing it again", p, e)
            return None

    def save(self, key: str, features: torch.Tensor, meta: dict) -> None:
        """Write the entry unless it is there: under a file lock, so ranks of a node and concurrent jobs
        sharing the dir never write the same file at once (nor twice)."""
        try:
            with file_lock(self.path(key)):
                if self.load(key, warn=False) is not None:  # written meanwhile; a damaged one is replaced
                    return
                atomic_write(
                    self.path(key), lambda f: torch.save({"features": features, "meta": meta}, f), shared=True
                )
                atomic_write_text(
                    self.path(key).with_suffix(".json"), json.dumps(meta, indent=1), shared=True
                )
        except OSError as e:
            reason = "no space left on device" if isinstance(e, DiskFullError) else e.strerror or str(e)
            raise DifflabError(
                f"cannot write the FID real-feature cache in {self.dir} ({reason}); free space there or "
                "move the cache with metrics.cache_dir=<dir> (checkpoints are untouched)"
            ) from None


@contextmanager
def all_cores() -> Iterator[None]:
    """Torch threads on every core this process may use, for the block. DDP gives each rank cores ÷
    ranks, but while rank 0 trains the classifier on the CPU the other ranks only wait for it."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_extractor(
    extractor: nn.Module, datamodule: object, device: torch.device, world: World | None = None
) -> None:
    """Rank 0 loads or trains the extractor (a classifier trains on ``device``); every other rank then
    uses rank 0's very network, sent to it, so a node whose cache dir is not rank 0's needs no copy."""
    rank = world.global_rank if world is not None else 0
    if rank == 0:
        with all_cores():
            extractor.prepare(datamodule, device=device)
    if world is not None and world.world_size > 1:
        state = world.broadcast(extractor.shared_state() if rank == 0 else None)
        if rank != 0:
            extractor.adopt(state, datamodule)


def real_features(
    datamodule: object,
    extractor: nn.Module,
    num_real: int,
    cache_dir: str | os.PathLike,
    device: torch.device,
    batch_size: int = 256,
    world: World | None = None,
) -> torch.Tensor:
    """Features of the first ``num_real`` training images (no random augmentation), cached; the same
    tensor on every rank of ``world``.

    Where any rank's cache dir lacks them, every rank extracts a 1/N shard on ``device`` and the shards
    are gathered (so no rank waits while one computes them all), and each rank whose dir lacked them
    writes them there: once per dir, shared by nodes or node-local."""
    cache = RealFeatureCache(cache_dir)
    key = cache.key(datamodule.identity, extractor.identity, num_real)
    feats = cache.load(key)
    everywhere = feats is not None
    if world is not None and world.world_size > 1:
        everywhere = world.reduce_boolean_decision(everywhere, all=True)
    if everywhere:
        return feats
    missing = feats is None
    feats = gather_real_features(datamodule, extractor, num_real, device, batch_size, world)
    if missing:
        meta = {"data": datamodule.identity, "extractor": extractor.identity, "num_real": len(feats)}
        cache.save(key, feats, meta)
    return feats


def gather_real_features(
    datamodule: object,
    extractor: nn.Module,
    num_real: int,
    device: torch.device,
    batch_size: int = 256,
    world: World | None = None,
) -> torch.Tensor:
    """The first ``num_real`` real features (float64, CPU), rank r extracting images
    ``[n*r/N, n*(r+1)/N)``; the result is in image order, as one process computes it."""
    rank, size = (world.global_rank, world.world_size) if world is not None else (0, 1)
    datamodule.setup()
    n = min(num_real, len(datamodule.train_set))
    bounds = [n * r // size for r in range(size + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    if size == 1:
        return compute_real_features(datamodule, extractor, n, device, batch_size)
    # all_gather needs one shape on every rank: shards (ceil(n/N) images or one fewer) are padded.
    longest = -(-n // size)
    padded = torch.zeros(longest, extractor.num_features, dtype=torch.float64, device=device)
    if hi > lo:
        padded[: hi - lo] = compute_real_features(datamodule, extractor, hi - lo, device, batch_size, lo)
    gathered = world.all_gather(padded).reshape(size, longest, -1).cpu()
    return torch.cat([gathered[r, : bounds[r + 1] - bounds[r]] for r in range(size)])


def compute_real_features(
    datamodule: object,
    extractor: nn.Module,
    num_real: int,
    device: torch.device,
    batch_size: int = 256,
    start: int = 0,
) -> torch.Tensor:
    log.info("computing FID real features: %d images from %d with %s", num_real, start, extractor.identity)
    extractor.to(device)
    return extract_features(extractor, datamodule.real_images(num_real, batch_size, start), device)


class FIDEvaluator:
    """Generates ``num_samples`` images split over ranks, and measures FID (and KID) against real features."""

    def __init__(
        self,
        extractor: nn.Module,
        num_samples: Annotated[int, AtLeast(2)] = 1000,  # checked by the commands' and the callback's rules
        kid: bool = False,
        kid_subset_size: int = 1000,
    ) -> None:
        self.extractor = extractor
        self.num_samples = num_samples
        self.fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        self.kid = None
        if kid:
            with warnings.catch_warnings():  # "will save all extracted features": a few MB at these sizes
                warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save")
                self.kid = KernelInceptionDistance(
                    feature=extractor,
                    reset_real_features=False,
                    subset_size=kid_subset_size_for(kid_subset_size, num_samples),
                )
        self._real_loaded = False

    def names(self) -> dict[str, str]:
        out = {"fid": metric_name(self.extractor.name, self.num_samples)}
        if self.kid is not None:
            out["kid"] = metric_name(self.extractor.name, self.num_samples, "kid")
        return out

    def set_real_features(self, feats: torch.Tensor, rank: int = 0, world_size: int = 1) -> None:
        """Give each rank a disjoint slice of the real features: the cross-rank sync (sums for FID, a
        gather for KID) then sees every real feature exactly once, on any number of ranks."""
        if self.kid is not None:  # torchmetrics refuses subsets larger than the real set, after sampling
            self.kid.subset_size = kid_subset_size_for(self.kid.subset_size, len(feats))
        feats = feats.double()[rank::world_size]
        with torch.no_grad():
            self.fid.real_features_sum.copy_(feats.sum(0))
            self.fid.real_features_cov_sum.copy_(feats.t().mm(feats))
            self.fid.real_features_num_samples.fill_(len(feats))
            if self.kid is not None:
                self.kid.real_features.clear()
                self.kid.real_features.append(feats)
        self._real_loaded = True

    def to(self, device: torch.device) -> FIDEvaluator:
        self.fid.to(device)
        if self.kid is not None:
            self.kid.to(device)
        return self

    def _share(self, rank: int, world: int) -> range:
        lo, hi = self.num_samples * rank // world, self.num_samples * (rank + 1) // world
        return range(lo, hi)

    @torch.no_grad()
    def evaluate(
        self, unet: nn.Module, sampler: object, steps: int, seed: int, batch_size: int = 250
    ) -> dict[str, float]:
        """Every rank calls this; each samples its share; the returned values are the same on all ranks."""
        if not self._real_loaded:
            raise RuntimeError("set_real_features() first")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        share = self._share(rank, world)
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()
        bad = torch.zeros((), device=self.fid.fake_features_sum.device)
        if len(share):
            for _, images in sample_images(
                unet, sampler, len(share), seed, steps, batch_size, start=share.start
            ):
                bad += (~images.isfinite()).any().to(bad.dtype)
                self.fid.update(images, real=False)
                if self.kid is not None:
                    self.kid.update(images, real=False)
        # NaN images would reach the matrix square root (MKL crashes the process there): one line
        # instead, on every rank (one all_reduce per evaluation).
        if world > 1:
            dist.all_reduce(bad)
        if bool(bad):
            raise DifflabError(
                "FID: the sampled images hold NaN/Inf (the EMA weights or the sampler diverged); "
                "check the run's loss, or sample another checkpoint"
            )
        names = self.names()
        out = {names["fid"]: float(self.fid.compute())}
        if self.kid is not None:
            mean, std = self.kid.compute()
            out[names["kid"]] = float(mean)
            out[names["kid"] + "_std"] = float(std)
        return out
