"""FID (and KID) of generated images against a dataset, distributed over ranks, with cached real features.

torchmetrics holds the statistics and syncs them across ranks in ``compute()``. Real features are
computed once per (dataset identity, transform, extractor, number of images), cached on disk, and
split into disjoint slices over the ranks, so the cross-rank sync counts each exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from difflab.diffusion.sampling import sample_images
from difflab.errors import DifflabError
from difflab.files import DiskFullError, atomic_write, atomic_write_text

log = logging.getLogger(__name__)


def count_label(n: int) -> str:
    """1000 → '1k', 2500 → '2500': the sample count as it appears in metric names."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


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

    def load(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)["features"]
        except Exception as e:  # damaged outside difflab's atomic writer (a copy, a disk): never trusted
            log.warning("the FID real-feature cache %s cannot be read (%s); computing it again", p, e)
            return None

    def save(self, key: str, features: torch.Tensor, meta: dict) -> None:
        # Ranks and concurrent sweep jobs may write the same cache: per-process temporary names.
        try:
            atomic_write(
                self.path(key), lambda f: torch.save({"features": features, "meta": meta}, f), shared=True
            )
            atomic_write_text(self.path(key).with_suffix(".json"), json.dumps(meta, indent=1), shared=True)
        except OSError as e:
            reason = "no space left on device" if isinstance(e, DiskFullError) else e.strerror or str(e)
            raise DifflabError(
                f"cannot write the FID real-feature cache in {self.dir} ({reason}); free space there or "
                "move the cache with metrics.cache_dir=<dir> (checkpoints are untouched)"
            ) from None


def real_features(
    datamodule: object,
    extractor: nn.Module,
    num_real: int,
    cache_dir: str | os.PathLike,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Features of the first ``num_real`` training images (no random augmentation), cached."""
    cache = RealFeatureCache(cache_dir)
    key = cache.key(datamodule.identity, extractor.identity, num_real)
    feats = cache.load(key)
    if feats is not None:
        return feats
    feats = compute_real_features(datamodule, extractor, num_real, device, batch_size)
    cache.save(
        key, feats, {"data": datamodule.identity, "extractor": extractor.identity, "num_real": len(feats)}
    )
    return feats


def compute_real_features(
    datamodule: object, extractor: nn.Module, num_real: int, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    log.info("computing FID real features: %d images with %s", num_real, extractor.identity)
    return extract_features(extractor, datamodule.real_images(num_real, batch_size), device)


class FIDEvaluator:
    """Generates ``num_samples`` images split over ranks, and measures FID (and KID) against real features."""

    def __init__(
        self, extractor: nn.Module, num_samples: int = 1000, kid: bool = False, kid_subset_size: int = 1000
    ) -> None:
        if num_samples < 2:
            raise DifflabError(f"FID needs num_samples >= 2, got {num_samples}")
        self.extractor = extractor
        self.num_samples = num_samples
        self.fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        self.kid = (
            KernelInceptionDistance(
                feature=extractor, reset_real_features=False, subset_size=min(kid_subset_size, num_samples)
            )
            if kid
            else None
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
            self.kid.subset_size = min(self.kid.subset_size, len(feats))
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
        if len(share):
            for _, images in sample_images(
                unet, sampler, len(share), seed, steps, batch_size, start=share.start
            ):
                self.fid.update(images, real=False)
                if self.kid is not None:
                    self.kid.update(images, real=False)
        names = self.names()
        out = {names["fid"]: float(self.fid.compute())}
        if self.kid is not None:
            mean, std = self.kid.compute()
            out[names["kid"]] = float(mean)
            out[names["kid"] + "_std"] = float(std)
        return out
