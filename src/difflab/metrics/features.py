"""Feature extractors for FID: the standard TF-Inception network, or a classifier difflab trains offline.

Every extractor takes float images in [0, 1] shaped (N, C, H, W) and returns (N, D) features, and has
``name`` (goes into metric names and results) and ``identity`` (goes into cache keys).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.files import atomic_write, file_lock
from difflab.rules import AtLeast, Exists

log = logging.getLogger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


def default_inception_path() -> Path:
    """Where torch-fidelity/torchmetrics download the FID Inception weights by default."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the TF-Inception-v3 that FID is defined with (via torch-fidelity)."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights_path: Annotated[str, Exists("file")] | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path).expanduser() if weights_path else default_inception_path()
        if not path.is_file():
            try:  # the network may be there: let torch-fidelity download to its default location
                if weights_path:
                    raise FileNotFoundError(path)
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            except Exception as e:
                raise DifflabError(
                    f"FID Inception weights not found at {path} and not downloadable "
                    f"({e.__class__.__name__}); download {INCEPTION_URL} to {default_inception_path()} "
                    "or set the extractor's weights_path"
                ) from e
        else:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        self.identity = "tf-inception-v3-2015-12-05:pool3"
        self.eval().requires_grad_(False)

    def prepare(
        self, datamodule: object, train_if_missing: bool = True, device: torch.device | None = None
    ) -> None:
        """Nothing to prepare: the network is fixed."""

    def shared_state(self) -> bytes | None:
        """Nothing to share: every rank loads the same fixed weights."""
        return None

    def adopt(self, state: bytes | None, datamodule: object) -> None:
        """Nothing to adopt (see ``shared_state``)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(uint8)[0].reshape(images.shape[0], -1).double()


class SmallClassifier(nn.Module):
    """A 4-layer CNN; its penultimate activations are the features."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, num_features: int = 128) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * w, num_features),
            nn.SiLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


Labels = Literal["auto", "dataset", "instance"]
# The version of the code that trains a classifier (SmallClassifier, shift_and_flip, fit, _train and the
# constants they use). It is part of every cached classifier's file name: bump it whenever a change to
# that code would train a different network, so no cache dir hands back a file the old code trained.
CLASSIFIER_VERSION = 2
# Training passes per label kind: class labels are learnt in a few; one class per image needs many.
DEFAULT_EPOCHS = {"dataset": 3, "instance": 40}
# Instance labels use at most this many images: the cost grows as images x passes (all 4,009 twemoji
# took 16 min on 2 busy cores), so a large folder's first FID would otherwise take hours.
INSTANCE_IMAGES = 4096


def shift_and_flip(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by up to 1/8 of its size (edges replicated) and mirrored with probability 1/2.
    Batched with one generator (torchvision's RandomCrop/RandomHorizontalFlip draw per image from the
    global RNG), so the classifier file is a function of its seed."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class ClassifierFeatures(nn.Module):
    """Features from a small classifier difflab trains offline: FID without downloads.

    ``labels``: ``dataset`` learns the dataset's classes; ``instance`` makes every image its own class
    under random shifts and flips (exemplar training, Dosovitskiy et al. 2014), so folders without
    labels get a feature space that tells images apart; ``auto`` is the first when the data has labels.
    ``prepare(datamodule)`` loads the classifier cached for that dataset and these settings (the file
    is named by a hash of the dataset's identity, every setting below and ``CLASSIFIER_VERSION``) or
    trains one (seconds on digits, about a minute on Fashion-MNIST with 2 cores) and caches it.
    Numbers are comparable only between runs using the same classifier file, whose hash is in
    ``identity``, and never with Inception FID.
    """

    name = "classifier"

    def __init__(
        self,
        cache_dir: str,
        path: Annotated[str, Exists("file")] | None = None,
        labels: Labels = "auto",
        epochs: Annotated[int, AtLeast(1)] | None = None,
        width: Annotated[int, AtLeast(1)] = 32,
        num_features: Annotated[int, AtLeast(1)] = 128,
        max_train_images: Annotated[int, AtLeast(1)] | None = 60000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cache_dir, self.path = Path(cache_dir), Path(path) if path else None
        self.labels, self.epochs = labels, epochs
        self.width, self.max_train_images, self.seed = width, max_train_images, seed
        self.num_features = num_features
        self.net: SmallClassifier | None = None
        self.identity = "classifier:unprepared"
        self._blob: bytes | None = None

    def label_kind(self, datamodule: object) -> str:
        """``dataset`` or ``instance``: what ``auto`` means for this data."""
        if self.labels != "auto":
            return self.labels
        datamodule.setup()  # the source exists only once set up
        return "dataset" if getattr(datamodule.source, "labels", None) is not None else "instance"

    def settings(self, kind: str) -> dict:
        """Everything besides the data that decides the trained classifier (defaults resolved): the
        cache key, and what its file records."""
        return {
            "labels": kind,
            "epochs": self.epochs or DEFAULT_EPOCHS[kind],
            "width": self.width,
            "num_features": self.num_features,
            "max_train_images": self.max_train_images,
            "instance_images": INSTANCE_IMAGES if kind == "instance" else None,
            "seed": self.seed,
            "version": CLASSIFIER_VERSION,
        }

    def cache_key(self, data_identity: str, kind: str = "dataset") -> str:
        """The text the cached file is named by: the data and every setting that changes the network,
        so a new seed, width or epoch count trains (and caches) a new classifier instead of reusing one."""
        return json.dumps({"data": data_identity, **self.settings(kind)}, sort_keys=True)

    def file_for(self, data_identity: str, kind: str = "dataset") -> Path:
        """The classifier file for this data and these settings (``path`` when given: used as it is)."""
        if self.path is not None:
            return self.path
        digest = hashlib.sha1(self.cache_key(data_identity, kind).encode()).hexdigest()[:16]
        return self.cache_dir / f"classifier_{digest}.pt"

    def prepare(
        self, datamodule: object, train_if_missing: bool = True, device: torch.device | None = None
    ) -> None:
        """Load this dataset's classifier, training it on ``device`` (default CPU) and caching it first
        if there is none. Jobs sharing the cache dir train it once: the others wait for the file lock,
        then load what the first one wrote."""
        kind = self.label_kind(datamodule)
        path = self.file_for(datamodule.identity, kind)
        if not path.is_file():
            if not train_if_missing:
                raise DifflabError(f"FID classifier {path} is missing (it is trained by rank 0 first)")
            with file_lock(path):
                if not path.is_file():
                    self._train(datamodule, kind, path, device)
        self.load(path)

    def _train(self, datamodule: object, kind: str, path: Path, device: torch.device | None) -> None:
        if kind == "dataset":
            images, labels = datamodule.labelled_images(self.max_train_images)
        else:
            available = len(datamodule.train_set)
            num = min(self.max_train_images or available, available, INSTANCE_IMAGES)
            images = torch.cat(list(datamodule.real_images(num, 4096)))
            labels = torch.arange(len(images))
        self._build(images.shape[1], int(labels.max()) + 1)
        epochs = self.settings(kind)["epochs"]
        meta = {"key": self.cache_key(datamodule.identity, kind)}
        self.fit(images, labels, path, augment=kind == "instance", epochs=epochs, device=device, meta=meta)

    def shared_state(self) -> bytes | None:
        """The classifier file this extractor loaded, for ranks whose cache dir lacks it."""
        return self._blob

    def adopt(self, state: bytes | None, datamodule: object) -> None:
        """Use rank 0's classifier file (``shared_state``), so every rank extracts with the very same
        network (one trained on another node would differ), and cache it in this rank's dir where it is
        missing (a node-local cache dir); an existing file there is left as it is."""
        path = self.file_for(datamodule.identity, self.label_kind(datamodule))
        if not path.is_file():
            with file_lock(path):
                if not path.is_file():
                    atomic_write(path, lambda f: f.write(state), shared=True)
        self._load_blob(state)

    def _build(self, channels: int, num_classes: int) -> None:
        # Initial weights from the seed (a trained file was a function of what drew from the global RNG
        # before), in a forked RNG: building it in a run's set-up leaves the run's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = SmallClassifier(channels, num_classes, self.width, self.num_features)

    def load(self, path: Path) -> None:
        self._load_blob(path.read_bytes())

    def _load_blob(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self._blob = blob
        self._build(state["channels"], state["num_classes"])
        self.net.load_state_dict(state["state_dict"])
        self.identity = f"classifier:{hashlib.sha1(blob).hexdigest()[:16]}"
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("ClassifierFeatures.prepare(datamodule) must run before extracting features")
        return self.net.body(images * 2 - 1).double()

    def fit(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        path: Path,
        batch_size: int = 128,
        lr: float = 2e-3,
        augment: bool = False,
        epochs: int = DEFAULT_EPOCHS["dataset"],
        device: torch.device | None = None,
        meta: dict | None = None,
    ) -> float:
        """Train on float images in [0, 1] and integer labels (batches moved to ``device``, default
        CPU), save to ``path``; returns train accuracy (of the last pass, on augmented images when
        ``augment``). The batch order and augmentation are drawn on the CPU: the same on any device.
        ``meta`` (e.g. the cache key it was trained for) is stored in the file beside the weights."""
        g = torch.Generator().manual_seed(self.seed)
        device = torch.device(device or "cpu")
        net = self.net.to(device).train().requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        n, correct = len(images), 0
        for _ in range(epochs):
            correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync
            for idx in torch.randperm(n, generator=g).split(batch_size):
                batch = shift_and_flip(images[idx], g) if augment else images[idx]
                target = labels[idx].to(device)
                logits = net(batch.to(device) * 2 - 1)
                loss = F.cross_entropy(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += (logits.argmax(1) == target).sum()
        correct = int(correct)
        net.cpu()
        state = {
            "state_dict": net.state_dict(),
            "channels": images.shape[1],
            "num_classes": int(labels.max()) + 1,
            "train_accuracy": correct / n,
            **(meta or {}),
        }
        atomic_write(path, lambda f: torch.save(state, f), shared=True)  # ranks may train it at once
        log.info("trained FID classifier on %d images: train accuracy %.3f, saved %s", n, correct / n, path)
        return correct / n
