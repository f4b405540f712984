"""DataModule: shapes, range, channel conversion, alpha, 16-bit, reproducible flips, bad input messages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.datamodule import (
    ChunkedShuffleSampler,
    ImageDataModule,
    ResumableLoader,
    ShardedShuffleSampler,
)
from difflab.data.sources import FolderSource, digits_source, fashion_mnist_source
from difflab.data.transforms import pil_to_tensor
from difflab.errors import DifflabError


def first_batch(dm: ImageDataModule) -> torch.Tensor:
    """The first training batch as the model sees it (normalised after the device transfer)."""
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


def folder_dm(path: Path, **kw) -> ImageDataModule:
    kw.setdefault("resolution", 16)
    kw.setdefault("channels", 3)
    kw.setdefault("batch_size", 4)
    skip = kw.pop("skip_bad_images", False)
    return ImageDataModule(source=lambda: FolderSource(str(path), skip_bad_images=skip), **kw)


def write_images(folder: Path, n: int, mode: str = "RGB", size=(20, 24), ext="png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(folder / f"img_{i}.{ext}")


def test_digits_batches_have_shape_dtype_and_range():
    dm = ImageDataModule(source=digits_source, resolution=8, channels=1, batch_size=32)
    batch = first_batch(dm)
    assert batch.shape == (32, 1, 8, 8) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert batch.min() == -1 and batch.max() == 1  # digits have pure black and white pixels


def test_resize_and_center_crop_from_a_non_square_folder(tmp_path):
    write_images(tmp_path / "imgs" / "nested", 6, size=(40, 20))  # found recursively
    batch = first_batch(folder_dm(tmp_path / "imgs", resolution=16))
    assert batch.shape == (4, 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 1), ("L", 3), ("RGBA", 1)])
def test_channel_conversion(tmp_path, mode, channels):
    write_images(tmp_path / "imgs", 4, mode=mode)
    batch = first_batch(folder_dm(tmp_path / "imgs", channels=channels))
    assert batch.shape[1] == channels
    if mode == "L" and channels == 3:  # grey → RGB: three identical planes
        assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])


def test_rgba_is_composited_on_the_background():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert pil_to_tensor(img, 3).unique().tolist() == [255]  # white by default
    assert pil_to_tensor(img, 3, background=(0, 0, 0)).unique().tolist() == [0]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # half-opaque black on white → mid grey
    assert abs(int(pil_to_tensor(half, 1)[0, 0, 0]) - 127) <= 1


def png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_every_bit_depth_maps_to_the_same_range(tmp_path, channels):
    """One picture saved as 8-bit grey, 16-bit grey, 8-bit RGB and 16-bit RGB in one folder: the four
    train on the same tensor in [-1, 1] (8-bit images used to reach 509 beside 16-bit ones)."""
    grey8 = np.tile(np.array([0, 64, 128, 255], dtype=np.uint8), (8, 2))  # 8 x 8
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(grey8, "L").save(folder / "a_grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "b_grey16.png")
    Image.fromarray(np.stack([grey8] * 3, -1), "RGB").save(folder / "c_rgb8.png")
    png16_rgb(folder / "d_rgb16.png", np.stack([grey8.astype(np.uint16) * 257] * 3, -1))
    assert Image.open(folder / "b_grey16.png").mode.startswith("I")
    batch = first_batch(folder_dm(folder, resolution=8, channels=channels, shuffle=False))
    assert batch.shape == (4, channels, 8, 8) and batch.min() == -1 and batch.max() == 1
    expected = torch.from_numpy(grey8).float() / 127.5 - 1
    for image in batch:
        assert torch.equal(image, expected.expand_as(image))


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """An upright 32x32 picture (white top-left quadrant) stored rotated a quarter turn with EXIF
    orientation 6 ("rotate 90 clockwise to display"), as phones write portrait photos. Returns it upright."""
    upright = np.zeros((32, 32), dtype=np.uint8)
    upright[:16, :16] = 255
    stored = Image.fromarray(upright, "L").convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    return upright


def test_exif_orientation_is_applied_in_training_prepare_and_fid(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    upright = torch.from_numpy(exif_rotated_jpeg(folder / "phone.jpg")).float() / 127.5 - 1
    assert not np.asarray(Image.open(folder / "phone.jpg"))[:16, :16].mean() > 128  # stored sideways
    dm = folder_dm(folder, resolution=32, channels=1, batch_size=1)
    trained = first_batch(dm)[0, 0]
    assert (trained - upright).abs().max() < 0.1
    reference = next(dm.real_images(1))[0, 0] * 2 - 1  # the FID reference images
    assert (reference - upright).abs().max() < 0.1
    from difflab.data.shards import ShardItems, decode

    shard = decode(ShardItems(FolderSource(str(folder)), 1, (255, 255, 255), None, "png", 95)(0)["image"])
    assert (shard[0].float() / 127.5 - 1 - upright).abs().max() < 0.1


def test_sixteen_bit_images_use_their_full_range():
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    t = pil_to_tensor(Image.fromarray(arr), 1)
    assert t.dtype == torch.uint8 and t[0, 0].tolist() == [0, 4, 128, 255]  # not clipped at 255


def test_flip_is_random_but_reproducible():
    def epoch_batches(seed: int, epoch: int) -> torch.Tensor:
        dm = ImageDataModule(
            source=digits_source, resolution=8, channels=1, batch_size=64, flip=True, seed=seed
        )
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat(list(loader))

    a, b = epoch_batches(1, 0), epoch_batches(1, 0)
    assert torch.equal(a, b)  # same seed and epoch → identical data, flips included
    assert not torch.equal(a, epoch_batches(1, 1))  # another epoch → another order and other flips
    # Roughly half the images are mirrored: compare with the unflipped images in the same order.
    dm = ImageDataModule(source=digits_source, resolution=8, channels=1, batch_size=64, seed=1)
    plain = torch.cat(list(dm.train_dataloader()))
    flipped = (a == plain.flip(-1)).flatten(1).all(1) & ~(a == plain).flatten(1).all(1)
    assert 0.4 < flipped.float().mean() < 0.6


def test_batched_fetch_equals_per_image_fetch():
    dm = ImageDataModule(source=digits_source, resolution=8, channels=1, flip=True, seed=3)
    dm.setup()
    keys = [(i, 2) for i in range(0, 500, 7)]
    batched = dm.train_set.__getitems__(keys)
    assert batched.dtype == torch.uint8  # normalised later, on the device
    assert torch.equal(batched, torch.stack([dm.train_set[k] for k in keys]))


def test_shards_are_disjoint_and_cover_the_epoch():
    shards = [list(ShardedShuffleSampler(100, seed=3, rank=r, world_size=2, drop_last=True)) for r in (0, 1)]
    idx = [{i for i, _ in s} for s in shards]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not idx[0] & idx[1] and len(idx[0] | idx[1]) == 100


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(DifflabError, match=r"nope.*is not a directory"):
        FolderSource(str(tmp_path / "nope"))


def test_empty_directory_names_path_and_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(
        DifflabError, match=r"no images found under .*empty.*\.png, \.jpg, \.jpeg, \.webp, \.bmp"
    ):
        FolderSource(str(tmp_path / "empty"))


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_bad_image_names_the_file(tmp_path, content):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(content)
    with pytest.raises(DifflabError, match=r"broken\.jpg"):
        FolderSource(str(tmp_path / "imgs"))


def test_bad_images_can_be_skipped_with_one_warning(tmp_path, caplog):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    (tmp_path / "imgs" / "b.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        src = FolderSource(str(tmp_path / "imgs"), skip_bad_images=True)
    assert len(src) == 3
    warnings = [r for r in caplog.records if "skipped" in r.message]
    assert len(warnings) == 1 and "skipped 2 unreadable" in warnings[0].getMessage()


def _truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])


def _huge_png(path: Path) -> None:
    Image.new("RGB", (40, 40)).save(path)  # a decompression bomb once PIL's limit is lowered below


BAD_ENTRIES = {  # name -> (how to make it, what the one line says)
    "empty.png": (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
    "garbage.jpg": (lambda p: p.write_bytes(b"not an image at all"), r"cannot read image"),
    "cut.png": (_truncated_png, r"cannot read image .*truncated"),
    "huge.png": (_huge_png, r"too large to decode safely"),
    "dangling.png": (lambda p: p.symlink_to(p.parent / "gone.png"), r"broken symbolic link .*gone\.png"),
    "loop.png": (lambda p: p.symlink_to(p), r"cannot be followed: Too many levels of symbolic links"),
    "fifo.png": (lambda p: os.mkfifo(p), r"is not a regular file"),
}


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
def test_bad_entries_are_one_line_or_one_warning(tmp_path, monkeypatch, caplog, name):
    """Each kind of bad entry stops the run naming it (never dropped in silence); with
    data.skip_bad_images=true it is counted in the one summary warning."""
    if name == "huge.png":  # 40x40 > 2x500 pixels: PIL's DecompressionBombError
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    write_images(tmp_path / "imgs", 3, size=(8, 8))
    make, message = BAD_ENTRIES[name]
    make(tmp_path / "imgs" / name)
    with pytest.raises(DifflabError, match=message) as e:
        FolderSource(str(tmp_path / "imgs"))
    assert name in str(e.value) and "\n" not in str(e.value)
    assert "skip_bad_images=true" in str(e.value)
    with caplog.at_level(logging.WARNING):
        src = FolderSource(str(tmp_path / "imgs"), skip_bad_images=True)
    assert len(src) == 3
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 unreadable" in warnings[0] and name in warnings[0]


def test_an_image_that_goes_bad_during_training_is_one_line_from_a_loader_worker(tmp_path):
    """torch re-raises a worker's error with the worker's traceback in front of its message."""
    write_images(tmp_path / "imgs", 8, size=(8, 8))
    dm = folder_dm(tmp_path / "imgs", resolution=8, num_workers=1, persistent_workers=False)
    dm.setup()
    (tmp_path / "imgs" / "img_3.png").write_bytes(b"overwritten after the start-up check")
    with pytest.raises(DifflabError) as e:
        list(dm.train_dataloader())
    assert str(e.value).startswith(f"cannot read image {tmp_path / 'imgs' / 'img_3.png'}: ")
    assert "\n" not in str(e.value)


def _rgb(path: Path, colour=(200, 30, 60)) -> None:
    Image.new("RGB", (8, 8), colour).save(path)


def _cmyk_jpeg(path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 30, 60)).convert("CMYK").save(path, quality=100)


def _palette_transparent(path: Path) -> None:  # index 0 transparent: composited on the white background
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    img.save(path, transparency=0)


def _animated_gif(path: Path) -> None:  # the first frame is the image
    frames = [
        Image.new("RGB", (8, 8), c).convert("P", palette=Image.Palette.ADAPTIVE)
        for c in ((200, 30, 60), (0, 0, 255))
    ]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def _inside_a_folder_named_like_an_image(path: Path) -> None:
    path.mkdir()
    _rgb(path / "inner.png")


def _linked_folder(path: Path) -> None:  # a symlink to a folder elsewhere is followed
    target = path.parent.parent / "elsewhere"
    target.mkdir()
    _rgb(target / "linked.png")
    path.symlink_to(target)


ODD_BUT_GOOD = {  # name -> (how to make it, the RGB colour the image decodes to)
    "cmyk.jpg": (_cmyk_jpeg, (200, 30, 60)),
    "palette.png": (_palette_transparent, (255, 255, 255)),
    "animated.gif": (_animated_gif, (200, 30, 60)),
    "dir.png": (_inside_a_folder_named_like_an_image, (200, 30, 60)),
    "link": (_linked_folder, (200, 30, 60)),
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_GOOD))
def test_odd_but_valid_entries_decode_correctly(tmp_path, name):
    make, colour = ODD_BUT_GOOD[name]
    folder = tmp_path / "imgs"
    folder.mkdir()
    make(folder / name)
    (folder / "loop").symlink_to(folder)  # a folder linked into itself is walked once
    src = FolderSource(str(folder), extensions=[*FolderSource.__init__.__defaults__[0], ".gif"])
    assert len(src) == 1
    pixel = pil_to_tensor(src[0], 3)[:, 4, 4].tolist()
    assert all(abs(a - b) <= 3 for a, b in zip(pixel, colour, strict=True)), (pixel, colour)


def test_fashion_mnist_missing_gives_how_to_fix(tmp_path):
    with pytest.raises(DifflabError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_source(root=str(tmp_path), download_root=None)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_reads_debian_idx_files():
    src = fashion_mnist_source(max_items=100)
    assert src.images.shape == (100, 1, 28, 28) and src.images.dtype == torch.uint8
    assert len(fashion_mnist_source(split="test")) == 10_000


def test_batch_larger_than_the_shard_is_refused():
    dm = ImageDataModule(source=lambda: digits_source(max_items=10), resolution=8, channels=1, batch_size=32)
    with pytest.raises(DifflabError, match=r"fewer than data\.batch_size=32"):
        dm.train_dataloader()


def test_hf_source_from_a_saved_dataset(tmp_path):
    import datasets

    from difflab.data.sources import HFSource

    imgs = [Image.fromarray(np.full((12, 10, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"picture": imgs, "label": list(range(5))}).cast_column(
        "picture", datasets.Image()
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = ImageDataModule(
        source=lambda: HFSource(str(tmp_path / "saved"), image_column="picture"),
        resolution=8,
        channels=1,
        batch_size=5,
        shuffle=False,
    )
    batch = first_batch(dm)
    assert batch.shape == (5, 1, 8, 8)
    assert torch.allclose(batch[:, 0, 0, 0], torch.tensor([40.0 * i for i in range(5)]) / 127.5 - 1)
    assert dm.identity.startswith("hf:")
    with pytest.raises(DifflabError, match=r"image_column='image' not in dataset .*columns: picture, label"):
        HFSource(str(tmp_path / "saved"))
    with pytest.raises(DifflabError, match=r"image_column='label' of .* holds int values, not images"):
        HFSource(str(tmp_path / "saved"), image_column="label")


def test_hf_source_applies_exif_orientation(tmp_path):
    import datasets

    from difflab.data.sources import HFSource

    upright = exif_rotated_jpeg(tmp_path / "phone.jpg")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "phone.jpg")]}).cast_column(
        "image", datasets.Image()
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    trained = pil_to_tensor(HFSource(str(tmp_path / "saved"))[0], 1)[0].int()
    assert (trained - torch.from_numpy(upright).int()).abs().max() < 13


class _Keys(torch.utils.data.Dataset):
    """The sampler's (index, epoch) keys themselves, to compare orders."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(key)


def _loader(workers: int, num_items: int = 50, rank: int = 0, world: int = 1) -> ResumableLoader:
    sampler = ShardedShuffleSampler(num_items, seed=3, drop_last=True, rank=rank, world_size=world)
    return ResumableLoader(_Keys(), sampler, batch_size=4, num_workers=workers, drop_last=True)


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0), (2, 1)])
def test_loader_position_resumes_exactly_with_another_worker_count(before, after):
    """The checkpointed state is (epoch, batches served): Lightning creates the resumed loader's
    iterator before it calls set_epoch, and the workers may be more or fewer than before."""
    straight = _loader(before)
    straight.sampler.set_epoch(1)
    it = iter(straight)
    first = [next(it) for _ in range(3)]
    state = straight.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    rest = list(it)
    resumed = _loader(after)
    resumed.load_state_dict(state)
    it = iter(resumed)  # created first ...
    resumed.sampler.set_epoch(1)  # ... then Lightning sets the same epoch: the position is kept
    again = list(it)
    assert len(again) == len(rest) == 12 - 3 and all(
        torch.equal(x, y) for x, y in zip(again, rest, strict=True)
    )
    keys = torch.cat(first + again)
    assert keys[:, 1].eq(1).all() and keys[:, 0].tolist() == straight.sampler.order(1)[:48]
    assert straight.sampler.order(1) != straight.sampler.order(0)


def test_loader_state_at_the_end_of_an_epoch_resumes_at_the_next():
    """50 items, batch 4, drop_last: the epoch ends after 12 batches with 2 items left over; the
    state then names the next epoch, not the left-over items."""
    loader = _loader(0, rank=1, world=2)
    assert len(list(loader)) == 6
    assert loader.state_dict() == {"epoch": 1, "batches": 0}
    resumed = _loader(0, rank=1, world=2)
    resumed.load_state_dict(loader.state_dict())
    assert torch.cat(list(resumed))[:, 0].tolist() == loader.sampler.order(1)[:24]
    resumed.sampler.set_epoch(2)  # a new epoch always starts at its beginning
    assert torch.cat(list(resumed))[:, 1].eq(2).all()


def test_loader_reads_the_state_torchdatas_loader_wrote():
    """Checkpoints from before ResumableLoader hold torchdata StatefulDataLoader states."""
    for state in (
        {"_sampler_iter_state": {"epoch": 2, "yielded": 8}, "_num_yielded": 2},
        {
            "_snapshot": {
                "_main_snapshot": {"_sampler_iter_state": {"epoch": 2, "yielded": 12}, "_num_yielded": 2}
            }
        },
    ):
        loader = _loader(0)
        loader.load_state_dict(state)
        assert torch.cat(list(loader))[:, 0].tolist() == loader.sampler.order(2)[8:48]


def test_chunked_order_reads_block_by_block_and_splits_ranks_by_chunk():
    sizes, block = [700, 300, 1000, 5], 256
    starts = [0, 700, 1000, 2000]
    chunk_of = lambda i: max(c for c in range(4) if starts[c] <= i)  # noqa: E731
    orders = {
        (e, r): ChunkedShuffleSampler(sizes, 7, block, rank=r, world_size=2).order(e)
        for e in (0, 1)
        for r in (0, 1)
    }
    for e in (0, 1):
        both = orders[e, 0] + orders[e, 1]
        # equal halves that cover the epoch, one image padded (drop_last=false)
        assert len(orders[e, 0]) == len(orders[e, 1]) == 1003 and sorted(set(both)) == list(range(2005))
        for r in (0, 1):
            o = orders[e, r]
            # each chunk's items, and each aligned block's, come in one contiguous run
            for key in (chunk_of, lambda i: (chunk_of(i), (i - starts[chunk_of(i)]) // block)):
                runs = [key(i) for k, i in enumerate(o) if k == 0 or key(o[k - 1]) != key(i)]
                assert len(runs) == len(set(runs)), runs
            assert o != sorted(o)  # shuffled inside blocks too
    assert orders[0, 0] != orders[1, 0]  # a new order every epoch
    plain = ChunkedShuffleSampler(sizes, 7, block, shuffle=False).order(0)
    assert plain == list(range(2005))
