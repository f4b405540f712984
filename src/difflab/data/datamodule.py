"""LightningDataModule: a source, the image transform, a sharded reproducible sampler, stateful loaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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

    def base_image(self, index: int) -> torch.Tensor:
        """Image ``index`` after conversion and the deterministic transform, before augmentation."""
        if self.prepared is not None:
            return self.prepared[index]
        img = to_model_input(self.source[index], self.channels, self.background)
        if img.shape[0] != self.channels:
            raise DifflabError(
                f"image {index} has {img.shape[0]} channels after conversion, "
                f"expected data.channels={self.channels}"
            )
        return self.transform.deterministic(img)

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

    ``resume`` sets an epoch and position that survive the order Lightning resumes in (it creates the
    loader's iterator before it calls ``set_epoch`` with the same epoch), so a sampler that only
    learned its epoch from ``set_epoch`` cannot replay the wrong epoch's order.
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
        self.start = 0  # where the next iterator starts in the epoch: > 0 only right after resume()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the same one keeps a resumed position
            self.epoch, self.start = epoch, 0

    def resume(self, epoch: int, position: int) -> None:
        """The next iterator starts at ``position`` (indices already used) of ``epoch``."""
        if position >= len(self):  # saved after the last index of an epoch: what follows is the next one
            epoch, position = epoch + 1, 0
        self.epoch, self.start = epoch, position

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
        epoch, start = self.epoch, self.start
        self.start = 0
        for i in self.order(epoch)[start:]:
            yield i, epoch


class ChunkedShuffleSampler(ShardedShuffleSampler):
    """``ShardedShuffleSampler`` for a chunked store (LitData shards): an order that reads block by block.

    LitData decodes a chunk's items in aligned blocks (``block`` rows, one record batch each) and
    keeps the last block decoded: a fully random order decodes a block per item and reads ~40x
    slower. So, as in LitData's own loader, the order is hierarchical: chunks are permuted per epoch,
    ranks take equal contiguous slices of that stream (a rank reads only its own chunks, sharing at
    most two at the seams), and inside a rank's part of each chunk the blocks are permuted, then the
    items inside each block. ``difflab-prepare`` writes images in a shuffled order, so a block is a
    random sample of the whole set. Like the base class, the order is a pure function of (seed,
    epoch, rank, world size) and the DataLoader's workers only fetch: that is what makes a resume
    with another ``num_workers`` exact (LitData's loader assigns chunks to workers, so its order is
    not).
    """

    def __init__(self, chunk_sizes: Sequence[int], seed: int, block: int, **kwargs: Any) -> None:
        super().__init__(sum(chunk_sizes), seed, **kwargs)
        self.chunk_sizes, self.block = torch.tensor(list(chunk_sizes)), block

    def order(self, epoch: int) -> list[int]:
        sizes = self.chunk_sizes
        if self.shuffle:
            chunks = torch.randperm(
                len(sizes), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
        else:
            chunks = torch.arange(len(sizes))
        starts = torch.cumsum(sizes, 0) - sizes
        stream = torch.cat([torch.arange(starts[c], starts[c] + sizes[c]) for c in chunks.tolist()])
        part = torch.repeat_interleave(torch.arange(len(sizes)), sizes[chunks])  # chunk position per item
        extra = len(self) * self.world_size - self.num_items
        if extra > 0:  # pad so every rank gets the same number of items (drop_last=false)
            stream, part = torch.cat([stream, stream[:extra]]), torch.cat([part, part[:extra] + len(sizes)])
        lo = self.rank * len(self)
        stream, part = stream[lo : lo + len(self)], part[lo : lo + len(self)]
        if self.shuffle:  # sort by (chunk position, random block key, random item key)
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank))
            blocks_per_chunk = -(-int(sizes.max()) // self.block)
            block = part * blocks_per_chunk + (stream - starts[chunks.repeat(2)[part]]) // self.block
            block_key = torch.rand(int(block.max()) + 1, generator=g)[block]
            perm = torch.randperm(len(stream), generator=g)
            perm = perm[torch.argsort(block_key[perm], stable=True)]
            perm = perm[torch.argsort(part[perm], stable=True)]
            stream = stream[perm]
        return stream.tolist()


class ResumableLoader(DataLoader):
    """A DataLoader whose checkpointed state is (epoch, batches served), whatever ``num_workers`` is.

    Written here rather than using torchdata's StatefulDataLoader because that one's state is a
    snapshot per worker process and refuses to load into another worker count; here the dataset is
    stateless and the sampler's order is a pure function of the epoch, so the position alone resumes
    exactly, with any number of workers. Lightning saves it like any stateful loader.
    """

    sampler: ShardedShuffleSampler

    def __init__(self, dataset: Dataset, sampler: ShardedShuffleSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch, self._served = getattr(sampler, "epoch", 0), 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: runs from the first next(), i.e. after Lightning's set_epoch, and counts what
        # the training loop has actually received (workers prefetch ahead of it). Lightning swaps in
        # a plain sampler for overfit_batches: then this is a plain DataLoader.
        self._epoch = getattr(self.sampler, "epoch", self._epoch)
        self._served = getattr(self.sampler, "start", 0) // self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._served >= len(self):  # the epoch is over (a remainder below drop_last's batch too)
            return {"epoch": self._epoch + 1, "batches": 0}
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batches" not in state:  # a checkpoint written with torchdata's StatefulDataLoader
            main = state.get("_snapshot", {}).get("_main_snapshot", state)
            state = {"epoch": main["_sampler_iter_state"]["epoch"], "batches": main["_num_yielded"]}
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if isinstance(self.sampler, ShardedShuffleSampler):
            self.sampler.resume(epoch, batches * self.batch_size)
        self._epoch, self._served = self.sampler.epoch, batches


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

    def real_images(self, num: int, batch_size: int = 256, start: int = 0) -> Iterator[torch.Tensor]:
        """``num`` training images from index ``start`` (fewer at the end) without random augmentation,
        float [0, 1], in batches."""
        self.setup()
        stop = min(start + num, len(self.train_set))
        for lo in range(start, stop, batch_size):
            yield torch.stack([self._unaugmented(i) for i in range(lo, min(lo + batch_size, stop))])

    def labelled_images(self, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float [0, 1], labels) for training the offline FID classifier."""
        self.setup()
        labels = getattr(self.source, "labels", None)
        if labels is None:
            raise DifflabError(
                f"the FID 'classifier' extractor needs class labels, and {self.source.identity} has none; "
                "set metrics.extractor.labels=instance (label-free) or auto, or use the inception extractor"
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

    def _sampler(self, rank: int, world: int) -> ShardedShuffleSampler:
        return ShardedShuffleSampler(
            len(self.train_set), self.seed, self.shuffle, self.drop_last, rank, world
        )

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        sampler = self._sampler(*self._rank_world())
        self._check_images_per_device(len(sampler))
        return ResumableLoader(
            self.train_set,
            sampler=sampler,  # by name: Lightning re-creates the loader with its own (overfit_batches)
            batch_size=self.batch_size,
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
    """Images from LitData shards (``difflab-prepare``): LitData reads the chunks (and, from object
    storage, downloads them into a bounded cache); the order is ``ChunkedShuffleSampler``'s.

    Same transforms, normalisation, FID reference images and checkpointed position as
    ``ImageDataModule``; each rank reads its own chunks, one chunk at a time.
    """

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        self.source.check_against(self.resolution, self.channels)

    def _sampler(self, rank: int, world: int) -> ShardedShuffleSampler:
        return ChunkedShuffleSampler(
            self.source.chunk_sizes,
            self.seed,
            self.source.decode_block,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            rank=rank,
            world_size=world,
        )
