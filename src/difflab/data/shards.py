"""LitData shards of images: the format `difflab-prepare` writes and `data=streaming` reads.

Shards are LitData's own chunked format (``litdata.optimize`` writes ``index.json`` + ``chunk-*.bin``
locally or to object storage; ``StreamingDataset`` reads them, downloading remote chunks into a
bounded local cache), so a shard set can be read by any LitData tool. One item per image::

    {"image": PNG/JPEG bytes or a uint8 CHW tensor, "label": class id or -1,
     "size": shorter side the image was resized to (0: original size), "channels": 1 or 3}

The images went through the same decoding (EXIF orientation, alpha on the background colour, every
bit depth scaled to 8) and bad-image handling as training reads them; cropping and flipping stay
training-time transforms. ``size`` and ``channels`` travel in every item (a few bytes) rather than a
sidecar file so that a remote shard set is checked against the config from its first item, with no
second storage client.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from litdata import StreamingDataset
from torchvision.io import decode_image, encode_jpeg, encode_png
from torchvision.transforms import v2

from difflab.data.sources import IMAGE_EXTENSIONS
from difflab.data.transforms import to_model_input
from difflab.errors import DifflabError
from difflab.rules import AtLeast, Between

# LitData decodes a chunk's items in aligned blocks of this many (the record batches `optimize` writes,
# 256 in LitData 0.2; passed as `batch_decode` so both agree): reading a block's items together decodes
# it once (ChunkedShuffleSampler).
DECODE_BLOCK = 256

# png: lossless, compact; raw: lossless, fastest to read, largest; jpeg: lossy, smallest (quality).
Encoding = Literal["png", "raw", "jpeg"]
JpegQuality = Annotated[int, Between(1, 100)]
PrepareSize = Annotated[int, AtLeast(1)] | None  # resize the shorter side to this (None: keep sizes)


@dataclass(frozen=True)
class ByteSize:
    """A positive size as LitData reads it ("64MB", "500KB"), checked at start-up by LitData's own
    parser rather than failing after the output directory is made."""

    def problem(self, value: Any) -> str | None:
        from litdata.utilities.format import _convert_bytes_to_int

        try:
            size = value if isinstance(value, int) else _convert_bytes_to_int(str(value))
        except ValueError:
            return "is not a size; give a number and a unit (B, KB, MB, GB, TB), e.g. 64MB"
        return None if size > 0 else "must be above 0 bytes"


ChunkBytes = Annotated[int | str, ByteSize()]  # bytes, or a number and a unit


def is_remote(path: str) -> bool:
    """An object-store URI (s3://, gs://, ...) rather than a local directory."""
    return "://" in path and not path.startswith("file://")


def encode(image: torch.Tensor, encoding: Encoding, quality: int = 95) -> bytes | torch.Tensor:
    """A uint8 CHW image as stored in a shard."""
    if encoding == "raw":
        return image.contiguous()
    data = encode_png(image) if encoding == "png" else encode_jpeg(image, quality=quality)
    return data.numpy().tobytes()


def decode(stored: bytes | torch.Tensor) -> torch.Tensor:
    """A stored image back to uint8 CHW."""
    if isinstance(stored, torch.Tensor):
        return stored
    return decode_image(torch.frombuffer(bytearray(stored), dtype=torch.uint8))


class ShardItems:
    """The function ``litdata.optimize`` maps over image indices: source image → shard item.

    A class (not a closure) because LitData's workers receive it pickled.
    """

    def __init__(
        self,
        source: Any,
        channels: int,
        background: Sequence[int],
        size: int | None,
        encoding: Encoding,
        quality: int,
    ) -> None:
        self.source, self.channels, self.background = source, channels, tuple(background)
        self.size, self.encoding, self.quality = size, encoding, quality
        labels = getattr(source, "labels", None)
        self.labels = labels.tolist() if labels is not None else None
        self.resize = (
            v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True) if size else None
        )

    def image(self, index: int) -> torch.Tensor:
        img = to_model_input(self.source[index], self.channels, self.background)
        if self.resize is not None:
            img = self.resize(img)
        return img

    def __call__(self, index: int) -> dict[str, Any]:
        return {
            "image": encode(self.image(index), self.encoding, self.quality),
            "label": self.labels[index] if self.labels is not None else -1,
            "size": self.size or 0,
            "channels": self.channels,
        }


def _index_of(path: Path) -> dict:
    index = path / "index.json"
    if not index.is_file():
        if any(path.glob("chunk-*.bin")):
            found = (
                "holds chunks but no index.json (a difflab-prepare was stopped); rerun it with overwrite=true"
            )
        elif next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), None) is not None:
            found = (
                f"holds images, not shards: train on them with data=folder data.source.path={path}, or write "
                f"shards with `difflab-prepare data=folder data.source.path={path} out={path}_shards`"
            )
        else:
            empty = not any(path.iterdir())
            found = "is empty" if empty else "has no index.json"
            where = path if empty else "<new-dir>"
            found += f": not a shard set; write one with `difflab-prepare data=<source> out={where}`"
        raise DifflabError(f"data.source.path={path} {found}")
    try:
        found = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DifflabError(f"{index} is corrupt ({e}); prepare the shards again") from None
    chunks = found.get("chunks") if isinstance(found, dict) else None
    keys = ("filename", "chunk_bytes", "chunk_size")
    if not isinstance(chunks, list) or not all(
        isinstance(c, dict) and all(k in c for k in keys) for c in chunks
    ):
        raise DifflabError(f"{index} is not a LitData index (no list of chunks); prepare the shards again")
    return found


def check_chunks(path: Path, index: dict) -> None:
    """Every chunk file listed in ``index.json`` is there and whole.

    LitData treats a local chunk smaller than its recorded size as still downloading and waits for
    it, so a truncated file would hang the loader or end an epoch short: caught here, by name.
    """
    for chunk in index.get("chunks", []):
        f = path / chunk["filename"]
        if not f.is_file():
            raise DifflabError(f"shard chunk {f} is missing (listed in {path / 'index.json'})")
        size = f.stat().st_size
        if size < chunk["chunk_bytes"]:
            raise DifflabError(
                f"shard chunk {f} is truncated: {size} bytes, index.json records {chunk['chunk_bytes']}; "
                "copy it again or prepare the shards again"
            )


class ShardSource:
    """A shard set as a difflab source: ``len``, ``[i]`` (a decoded uint8 CHW image), ``identity``,
    ``labels`` and the settings the images were prepared with (``channels``, ``size``).

    Training reads it through ``ImageDataset`` in ``ChunkedShuffleSampler``'s chunk-by-chunk order
    (``chunk_sizes``); the FID reference images and the classifier's labels come from it too.
    """

    def __init__(
        self,
        path: str,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        self.path, self.cache_dir, self.max_cache_size = path, cache_dir, max_cache_size
        if is_remote(path):
            digest = path
        else:
            local = Path(path).expanduser()
            if not local.is_dir():
                raise DifflabError(
                    f"data.source.path={path} is not a directory; write shards there with "
                    f"`difflab-prepare data=<source> out={path}`"
                )
            self.path = str(local.resolve())
            index = _index_of(local)
            check_chunks(local, index)
            if not sum(chunk["chunk_size"] for chunk in index.get("chunks", [])):
                raise DifflabError(f"data.source.path={path} holds no images")
            digest = json.dumps(index.get("chunks", []), sort_keys=True)
        self._reader: StreamingDataset | None = None
        try:
            first = self.reader[0]
        except Exception as e:  # LitData (and a remote store) fail in many types on a damaged set
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DifflabError(
                f"cannot read the first image of {path}: {line}; prepare the shards again"
            ) from None
        if not isinstance(first, dict) or not {"image", "label", "size", "channels"} <= first.keys():
            raise DifflabError(
                f"the shards in {path} were not written by difflab-prepare (their items are not "
                "image/label/size/channels records); write them with `difflab-prepare`"
            )
        self.channels, self.size = int(first["channels"]), int(first["size"])
        self._labels: torch.Tensor | None = None
        has_labels = int(first["label"]) >= 0
        self.has_labels = has_labels
        self.identity = f"shards:{path}:n={len(self)}:{hashlib.sha1(digest.encode()).hexdigest()[:16]}"

    @property
    def reader(self) -> StreamingDataset:
        """Random access to the items (opened on first use, in each process that uses it)."""
        if self._reader is None:
            reader = self.streaming_dataset()
            reader[0]  # opens LitData's cache (index and chunk reader), which the setting below needs
            # Remote chunks are downloaded whole into the cache (reads go chunk by chunk), not fetched
            # item by item with two range requests each (LitData's default for random access).
            reader.on_demand_bytes = False
            self._reader = reader
        return self._reader

    decode_block = DECODE_BLOCK

    @property
    def chunk_sizes(self) -> list[int]:
        """Images per chunk, in index order (chunk k holds the next ``chunk_sizes[k]`` indices)."""
        return [end - start for _, start, end, _ in self.reader.cache.get_chunk_intervals()]

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned ranks and loader workers without the open reader (its cache holds file
        # handles and threads); each process opens its own.
        return {**self.__dict__, "_reader": None}

    def streaming_dataset(self) -> StreamingDataset:
        return StreamingDataset(
            self.path, cache_dir=self.cache_dir, max_cache_size=self.max_cache_size, batch_decode=DECODE_BLOCK
        )

    def check_against(self, resolution: int, channels: int) -> None:
        """The shards were prepared for this config (one line naming the path when not)."""
        if self.channels != channels:
            raise DifflabError(
                f"shards in {self.path} have {self.channels} channel(s) but data.channels={channels}; "
                f"set data.channels={self.channels} or prepare the shards again with data.channels={channels}"
            )
        if self.size and self.size < resolution:
            raise DifflabError(
                f"shards in {self.path} were resized to {self.size} px but data.resolution={resolution}; "
                f"set data.resolution<={self.size} or prepare again with resolution={resolution}"
            )

    def __len__(self) -> int:
        # The cache's length: the whole set. len(StreamingDataset) is this rank's share under DDP.
        return len(self.reader.cache)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode(self.reader[int(i)]["image"])

    @property
    def labels(self) -> torch.Tensor | None:
        """Class ids (read once, on demand: only the offline FID classifier needs them)."""
        if not self.has_labels:
            return None
        if self._labels is None:
            self._labels = torch.tensor([int(self.reader[i]["label"]) for i in range(len(self))])
        return self._labels


def shard_bytes(path: str) -> int:
    """Bytes of the chunk files of a local shard set."""
    return sum(f.stat().st_size for f in Path(path).glob("chunk-*.bin"))
