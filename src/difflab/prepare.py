"""`difflab-prepare`: write any difflab data source as LitData shards, for `data=streaming`.

difflab-prepare data=folder data.source.path=/my/images resolution=64 out=/data/shards/my_images
difflab-prepare data=fashion_mnist out=s3://bucket/fmnist num_workers=8
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from omegaconf import DictConfig

from difflab.cli import Command, keywords
from difflab.data.datamodule import ImageDataModule
from difflab.data.shards import Encoding, JpegQuality, PrepareSize, ShardItems, is_remote, shard_bytes
from difflab.errors import DifflabError
from difflab.rules import AtLeast

log = logging.getLogger("difflab.prepare")


def _ready_local_out(out: str, overwrite: bool) -> Path:
    """``out`` as an empty, writable directory; refuses to overwrite anything but a shard set."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise DifflabError(f"out={out} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise DifflabError(
                f"out={out} is not empty; choose a new directory or give overwrite=true to replace the shards"
            )
        foreign = [
            p.name for p in path.iterdir() if p.name != "index.json" and not p.name.startswith("chunk-")
        ]
        if foreign:
            raise DifflabError(
                f"out={out} holds files that are not shards ({', '.join(sorted(foreign)[:3])}); "
                "overwrite=true only replaces a shard set; choose another directory"
            )
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DifflabError(f"out={out} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DifflabError(f"out={out} is not writable")
    return path


def prepare(
    data: ImageDataModule,
    out: str,
    resolution: PrepareSize,
    encoding: Encoding,
    quality: JpegQuality,
    num_workers: Annotated[int, AtLeast(1)],
    chunk_bytes: str,
    overwrite: bool,
) -> dict[str, Any]:
    """Write ``data``'s images (its source, channel conversion and background) as shards in ``out``;
    returns the summary (conf/prepare.yaml documents each setting)."""
    from litdata import optimize

    local = None if is_remote(out) else _ready_local_out(out, overwrite)
    source = data.source_factory() if callable(data.source_factory) else data.source_factory
    items = ShardItems(source, data.channels, data.background, resolution, encoding, quality)
    n = len(source)
    log.info("writing %d images from %s to %s (%s)", n, source.identity, out, encoding)
    t0 = time.perf_counter()
    try:
        optimize(
            fn=items,
            # A seeded shuffle: each chunk, and each block LitData decodes, is then a random sample of
            # the set, which the chunk-by-chunk training order relies on (a folder sorted by class
            # would otherwise give one-class batches).
            inputs=torch.randperm(n, generator=torch.Generator().manual_seed(data.seed)).tolist(),
            output_dir=str(local) if local is not None else out,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            mode="overwrite" if overwrite and local is None else None,
            start_method="fork",  # the workers inherit the decoded source instead of re-reading it
        )
    except DifflabError:
        raise
    except Exception as e:  # LitData's worker and storage errors come in many types
        raise DifflabError(f"writing shards to out={out} failed: {str(e).strip().splitlines()[0]}") from e
    seconds = time.perf_counter() - t0
    size = shard_bytes(str(local)) if local is not None else None
    summary = {"images": n, "bytes": size, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1)}
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    kwargs = keywords(prepare, cfg)
    s = prepare(**kwargs)
    size = f"{s['bytes'] / 2**20:.1f} MB" if s["bytes"] is not None else "size on the remote store"
    print(
        f"wrote {s['images']} images ({size}) to {kwargs['out']} in {s['seconds']:.1f} s "
        f"({s['img_per_s']:.0f} img/s); train with: difflab-train data=streaming "
        f"data.source.path={kwargs['out']} data.channels={kwargs['data'].channels}"
    )
    return s


COMMAND = Command("prepare", run, prepare, out_is_run_dir=False)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
