"""A trained model for inference: the UNet (EMA, post-hoc EMA or live weights) and its noise schedule
from a training checkpoint or an exported diffusers pipeline, for difflab-sample, -eval and -export."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from difflab.checkpoints import load_checkpoint
from difflab.errors import DifflabError
from difflab.run_record import RunRecord

log = logging.getLogger(__name__)


def load_trained_unet(
    path: str | os.PathLike,
    use_ema: bool = True,
    channels_last: bool = False,
    unet_class: type | None = None,
    ema_std: float | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(UNet with EMA weights, noise-scheduler config, run config) from a training checkpoint or an
    exported diffusers pipeline directory. ``unet_class`` defaults to difflab's ``UNet2DModel``;
    ``channels_last`` gives NHWC weights (faster convolutions, same outputs); ``ema_std`` the weights
    of the post-hoc EMA of that length, reconstructed from the run's snapshots (diffusion/posthoc.py)."""
    from diffusers import DDPMScheduler

    from difflab.diffusion.unet import UNet2DModel

    unet_class = unet_class or UNet2DModel
    p = Path(path)
    if p.is_dir() and ema_std is not None:
        raise DifflabError(
            f"ema_std={ema_std} needs a training checkpoint (its run's EMA snapshots), not {p}"
        )
    if p.is_dir():
        if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
            raise DifflabError(
                f"{p} is neither a checkpoint file nor an exported pipeline (no model_index.json)"
            )
        try:
            unet = unet_class.from_pretrained(p / "unet")
            # The config as saved (a DDPM or a flow scheduler's): the objective is read from its keys.
            sched_cfg = {
                k: v for k, v in DDPMScheduler.load_config(p / "scheduler").items() if not k.startswith("_")
            }
        except (OSError, ValueError) as e:  # diffusers' errors for a missing, truncated or bad file
            raise DifflabError(
                f"{p} is a damaged exported pipeline ({str(e).strip().splitlines()[0]}); export it again"
            ) from None
        run_cfg = {}
    else:
        unet, sched_cfg, run_cfg = _unet_from_checkpoint(p, use_ema, unet_class, ema_std)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet.eval(), sched_cfg, run_cfg


def _unet_from_checkpoint(
    p: Path, use_ema: bool, unet_class: type, ema_std: float | None = None
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    ckpt = load_checkpoint(p)
    record = RunRecord.from_checkpoint(ckpt, p)
    unet = unet_class.from_config(record.unet_config)
    live = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    try:
        unet.load_state_dict(live)
    except RuntimeError as e:
        raise DifflabError(
            f"checkpoint {p} does not match its own UNet config: {str(e).splitlines()[0]}"
        ) from e
    if ema_std is not None:
        _load_posthoc(unet, record.snapshots(p), int(ckpt.get("global_step", 0)), p, ema_std)
    elif use_ema and "ema" in ckpt:
        params = list(unet.parameters())
        shadow = ckpt["ema"]["shadow_params"]
        if len(shadow) != len(params) or any(a.shape != b.shape for a, b in zip(shadow, params, strict=True)):
            raise DifflabError(f"checkpoint {p}: EMA weights do not match the UNet")
        with torch.no_grad():
            for dst, src in zip(params, shadow, strict=True):
                dst.copy_(src)
    elif use_ema:  # said, not silent: the user asked for EMA weights and gets others
        log.warning("%s holds no EMA weights (trained with ~model.ema): using its live weights", p)
    return unet, record.scheduler_config, record.config


def _load_posthoc(unet: torch.nn.Module, folder: Path, step: int, p: Path, ema_std: float) -> None:
    """Load the σ_rel=``ema_std`` post-hoc EMA, reconstructed from ``folder``'s snapshots up to ``step``
    (the checkpoint's)."""
    from difflab.diffusion.posthoc import list_snapshots, reconstruct

    snapshots = list_snapshots(folder, last_step=step)
    mine = json.loads(json.dumps(dict(unet.config), sort_keys=True, default=str))
    theirs = snapshots[-1].unet_config
    diffs = sorted(
        k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and not k.startswith("_")
    )
    if diffs:
        raise DifflabError(
            f"the EMA snapshots in {snapshots[-1].path.parent} were written by another UNet than {p} "
            f"(differs in {', '.join(diffs)})"
        )
    names = [n for n, _ in unet.named_parameters()]
    weights = reconstruct(snapshots, ema_std, names)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            param.copy_(weights[name])


def schedule_of(ckpt: str | os.PathLike) -> dict | None:
    """The noise-schedule config of a checkpoint or exported pipeline, read without loading weights
    (the checkpoint is memory-mapped), for the start-up checks; None where it cannot be read (the run
    itself then says why, in one line)."""
    path = Path(ckpt)
    try:
        if path.is_dir():
            return json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        return RunRecord.peek(path).scheduler_config
    except Exception:  # any unreadable file: reported by the loader, with its reasons, once the run starts
        return None
