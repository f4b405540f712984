"""LightningDataModule: a source, the image transform, a sharded reproducible sampler, stateful loaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from difflab.data.transforms import Crop, ImageTransform, flip_decision, normalize_batch, to_model_input
from difflab.errors import DifflabError
from difflab.rules import AtLeast, Between
from difflab.seeds import derive_seed

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Transforms a source's images; keys are ``index`` or ``(index, epoch)`` from the sampler."""

    def __init__(
        self, source: Any, transform: ImageTransform, channels: int, background: Sequence[int], seed: int
    ) -> None:
        self.source = source
        self.transform = transform
        self.channels = channels
        self.background = tuple(background)
        self.seed = seed
        self.prepared: torch.Tensor | None = None
        images = getattr(source, "images", None)
        if images is not None:
            # Small in-memory datasets: do channel conversion, Resize and CenterCrop once, not per epoch.
            out = [
                transform.deterministic(to_model_input(chunk, channels, self.background))
                for chunk in images.split(4096)
            ]
            self.prepared = torch.cat(out).contiguous()

    def __len__(self) -> int:
        return len(self.source)

    def base_image(self, index: int, raw: Any = None) -> torch.Tensor:
        """Image ``index`` (or its already-read ``raw`` image) after conversion and the deterministic
        transform, before augmentation."""
        if self.prepared is not None:
            return self.prepared[index]
        img = to_model_input(self.source[index] if raw is None else raw, self.channels, self.background)
        if img.shape[0] != self.channels:
            raise DifflabError(
                f"image {index} has {img.shape[0]} channels after conversion, "
                f"expected data.channels={self.channels}"
            )
        return self.transform.deterministic(img)

    def transformed(self, raw: Any, index: int, epoch: int) -> torch.Tensor:
        """``raw`` (image ``index``, read by a streaming loader) as ``self[(index, epoch)]`` gives it."""
        return self.transform.augment(self.base_image(index, raw), derive_seed(self.seed, epoch, index))

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """One image, augmented, not yet normalised (uint8, or float in [0, 1] for 16-bit sources)."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.transform.augment(self.base_image(index), derive_seed(self.seed, epoch, index))

    def __getitems__(self, keys: list) -> torch.Tensor | list[torch.Tensor]:
        """A whole batch at once (the DataLoader uses this when present): one gather from the prepared
        tensor and vectorised flips, instead of a Python call per image. Same images as __getitem__."""
        if self.prepared is None or self.transform.random_crop is not None:
            return [self[k] for k in keys]
        pairs = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        batch = self.prepared[torch.tensor([i for i, _ in pairs])]
        if self.transform.flip:
            flips = torch.tensor([flip_decision(derive_seed(self.seed, e, i)) for i, e in pairs])
            batch[flips] = batch[flips].flip(-1)
        return batch


def collate_images(data: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A batch from __getitems__ passes through; a list of images is stacked."""
    return data if isinstance(data, torch.Tensor) else torch.stack(data)


class ShardedShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffles with (seed, epoch) and gives each rank a disjoint shard, yielding (index, epoch).

    Written here rather than using DistributedSampler because the epoch must reach the dataset
    (per-sample augmentation seeds) and the same class must serve 1 and N ranks identically.

    It is Stateful (``state_dict``: epoch and position) because of the order Lightning resumes in:
    the fit loop creates the loader's iterator (and a worker loader already draws its first indices)
    *before* it calls ``set_epoch``, so a sampler that only learned its epoch from ``set_epoch`` would
    replay epoch 0's order in any epoch after the first. Its own saved epoch cannot be stale.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.yielded = 0  # indices handed out so far in this epoch (what the checkpoint records)
        self._resume_at = 0  # where the next iterator starts: > 0 only right after load_state_dict

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the same one keeps a restored position
            self.epoch, self._resume_at = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        if yielded >= len(self):  # saved after the last index of an epoch: what follows is the next one
            epoch, yielded = epoch + 1, 0
        self.epoch, self._resume_at = epoch, yielded

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.world_size
        return -(-self.num_items // self.world_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``: a pure function of (seed, epoch, rank, world size)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        total = len(self) * self.world_size
        if total > self.num_items:  # pad so every rank gets the same number of items
            order = torch.cat([order, order[: total - self.num_items]])
        return order[self.rank : total : self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self._resume_at
        self._resume_at = 0
        self.yielded = start
        for i in self.order(epoch)[start:]:
            self.yielded += 1
            yield i, epoch


class ImageDataModule(L.LightningDataModule):
    """Images for unconditional training, normalised to [-1, 1], shape (batch, channels, res, res)."""

    def __init__(
        self,
        source: Callable[[], Any],
        resolution: Annotated[int, AtLeast(1)] = 32,
        channels: Literal[1, 3] = 3,
        crop: Crop = "center",
        flip: bool = False,
        background: Sequence[Annotated[int, Between(0, 255)]] = (255, 255, 255),
        batch_size: Annotated[int, AtLeast(1)] = 64,
        num_workers: Annotated[int, AtLeast(0)] = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int | None = 0,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        self.source_factory = source
        self.resolution, self.channels = resolution, channels
        self.transform = ImageTransform(resolution, channels, crop=crop, flip=flip)
        self.background = tuple(background)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        self.drop_last, self.shuffle = drop_last, shuffle
        self.seed = seed if seed is not None else random.randrange(2**31)
        self.skip_bad_images = skip_bad_images
        self.source: Any = None
        self.train_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.source = self.source_factory() if callable(self.source_factory) else self.source_factory
        self.train_set = ImageDataset(self.source, self.transform, self.channels, self.background, self.seed)
        log.info("data: %d images from %s", len(self.train_set), self.source.identity)

    @property
    def identity(self) -> str:
        """What determines the training images: source identity plus the transform settings."""
        self.setup()
        return f"{self.source.identity}|res={self.resolution}|ch={self.channels}|bg={self.background}"

    def _unaugmented(self, index: int) -> torch.Tensor:
        """Image ``index`` after the deterministic transform only, as float in [0, 1]."""
        img = self.train_set.base_image(index)
        return img.float() / 255 if img.dtype == torch.uint8 else img.float()

    def real_images(self, num: int, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """The first ``num`` training images without random augmentation, float [0, 1], in batches."""
        self.setup()
        num = min(num, len(self.train_set))
        for lo in range(0, num, batch_size):
            yield torch.stack([self._unaugmented(i) for i in range(lo, min(lo + batch_size, num))])

    def labelled_images(self, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float [0, 1], labels) for training the offline FID classifier."""
        self.setup()
        labels = getattr(self.source, "labels", None)
        if labels is None:
            raise DifflabError(
                f"the FID 'classifier' extractor needs class labels, and {self.source.identity} has none; "
                "use the inception extractor (weights file) or give your own nn.Module by _target_"
            )
        num = min(num or len(labels), len(labels))
        return torch.cat(list(self.real_images(num, 4096))), labels[:num]

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _check_images_per_device(self, count: int) -> None:
        if count < self.batch_size and self.drop_last:
            raise DifflabError(
                f"each device gets {count} images, fewer than data.batch_size={self.batch_size} "
                "with data.drop_last=true; lower the batch size or set data.drop_last=false"
            )

    def train_dataloader(self) -> StatefulDataLoader:
        self.setup()
        rank, world = self._rank_world()
        sampler = ShardedShuffleSampler(
            len(self.train_set), self.seed, self.shuffle, self.drop_last, rank, world
        )
        self._check_images_per_device(len(sampler))
        return StatefulDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last,
            collate_fn=collate_images,
        )

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        """Normalise on the device: uint8 crossed the loader and the host-to-device copy."""
        return normalize_batch(batch)


class StreamingImageDataModule(ImageDataModule):
    """Images from LitData shards (``difflab-prepare``), read by LitData's StreamingDataLoader.

    Same transforms, normalisation and FID reference images as ``ImageDataModule``; what changes is
    the loader: chunks are read (and, from object storage, downloaded into a bounded cache) as the
    epoch goes, each rank reads its own part, and the loader's position goes into every checkpoint
    (LitData's ``state_dict``, saved by Lightning like any stateful loader). Shuffling is LitData's:
    chunk order and blocks within a chunk, reproducible from ``data.seed``.
    """

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        self.source.check_against(self.resolution, self.channels)

    def train_dataloader(self) -> Any:
        from difflab.data.shards import ImageShards, ShardLoader

        self.setup()
        _, world = self._rank_world()
        self._check_images_per_device(len(self.train_set) // world)
        shards = self.source.streaming_dataset(
            ImageShards, images=self.train_set, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last
        )
        return ShardLoader(
            shards,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last,
            collate_fn=collate_images,
        )
