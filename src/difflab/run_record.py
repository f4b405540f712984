"""The difflab part of a training checkpoint: everything besides Lightning's own state that a checkpoint
needs to be resumed, sampled, evaluated or exported without the config files that trained it.

A checkpoint is Lightning's dict (``state_dict``, ``optimizer_states``, ``loops``, ...) plus two keys of
ours: ``checkpoint["ema"]`` (the EMA's own ``state_dict``, written by the EMA class) and
``checkpoint["difflab"]``, which this module alone writes and reads:

    unet_config       the UNet's diffusers config (``UNet2DModel.from_config`` rebuilds it)
    scheduler_config  the training noise scheduler's diffusers config (its keys tell DDPM from flow)
    noise_seed        the seed of the training noise stream (resumes draw the same noise)
    config            the run's resolved config (resume checks, and what a sampler reports)
    log_window        the partly filled window of logged loss means (logged means resume exactly)
    ema_kind          "standard" | "posthoc" | "none"
    snapshot_dir      where a post-hoc EMA run keeps its snapshots (None for the others)
    guide_unet_config the config of the guide trained alongside (model.guide; its weights are the
                      state dict's ``guide.unet.*``, its EMA ``checkpoint["guide_ema"]``), or None
    format            this layout's version (2); checkpoints written before it carry none

Version 1 (every checkpoint before ``format`` existed) lacked ``ema_kind`` and ``snapshot_dir``:
``from_checkpoint`` reads them from the EMA state's own ``kind`` ("standard" when absent) and the run
config's ``model.ema.snapshot_dir``, so those checkpoints keep loading and resuming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from difflab.errors import DifflabError

KEY = "difflab"
FORMAT = 2
EmaKind = Literal["standard", "posthoc", "none"]


@dataclass
class RunRecord:
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    noise_seed: int | None
    config: dict[str, Any] = field(default_factory=dict)
    log_window: dict[str, Any] | None = None
    ema_kind: EmaKind = "none"
    snapshot_dir: str | None = None
    guide_unet_config: dict[str, Any] | None = None

    def to_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store this record in ``checkpoint`` (Lightning's dict, in ``on_save_checkpoint``)."""
        checkpoint[KEY] = {**asdict(self), "format": FORMAT}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str | Path = "") -> RunRecord:
        """The record of a loaded checkpoint, of this format or the one before it."""
        meta = checkpoint.get(KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or "unet_config" not in meta or "scheduler_config" not in meta:
            raise DifflabError(
                f"{path or 'the file'} is not a difflab training checkpoint (no 'difflab' metadata)"
            )
        if int(meta.get("format", 1)) > FORMAT:
            raise DifflabError(
                f"{path} was written by a newer difflab (checkpoint format {meta['format']}, this one "
                f"reads up to {FORMAT}): upgrade difflab to load it"
            )
        config = meta.get("config") or {}
        if "ema_kind" in meta:
            kind, snapshot_dir = meta["ema_kind"], meta.get("snapshot_dir")
        else:  # format 1
            ema = checkpoint.get("ema")
            kind = "none" if ema is None else ema.get("kind", "standard")
            ema_cfg = (config.get("model") or {}).get("ema") or {}
            snapshot_dir = ema_cfg.get("snapshot_dir") if kind == "posthoc" else None
        return cls(
            unet_config=dict(meta["unet_config"]),
            scheduler_config=dict(meta["scheduler_config"]),
            noise_seed=meta.get("noise_seed"),
            config=config,
            log_window=meta.get("log_window"),
            ema_kind=kind,
            snapshot_dir=snapshot_dir,
            guide_unet_config=meta.get("guide_unet_config"),
        )

    @classmethod
    def peek(cls, path: str | Path) -> RunRecord:
        """The record of the checkpoint file at ``path``, without reading its weights (memory-mapped):
        for start-up checks that need only the schedule or the config."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return cls.from_checkpoint(checkpoint, path)

    @property
    def objective(self) -> str:
        """ "ddpm" or "flow": what the noise scheduler's config says the model was trained for."""
        from difflab.diffusion.noise import objective_of  # here: diffusers is slow to import

        return objective_of(self.scheduler_config)

    def snapshots(self, checkpoint_path: str | Path) -> Path:
        """Where this run's post-hoc EMA snapshots are: the recorded folder while it exists, else
        ``ema_snapshots/`` beside the checkpoint's ``checkpoints/`` folder (a run dir moved whole)."""
        if self.snapshot_dir is not None and Path(self.snapshot_dir).is_dir():
            return Path(self.snapshot_dir)
        return Path(checkpoint_path).resolve().parent.parent / "ema_snapshots"
