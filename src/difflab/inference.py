"""A trained model for inference: the UNet (EMA, post-hoc EMA or live weights) and its noise schedule
from a training checkpoint or an exported diffusers pipeline, for difflab-sample, -eval and -export."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from difflab.checkpoints import config_differences, load_checkpoint
from difflab.errors import DifflabError
from difflab.run_record import RunRecord

log = logging.getLogger(__name__)


def load_trained_unet(
    path: str | os.PathLike,
    use_ema: bool = True,
    channels_last: bool = False,
    unet_class: type | None = None,
    ema_std: float | None = None,
    part: Literal["unet", "guide"] = "unet",
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(UNet with EMA weights, noise-scheduler config, run config) from a training checkpoint or an
    exported diffusers pipeline directory. ``unet_class`` defaults to difflab's ``UNet2DModel``;
    ``channels_last`` gives NHWC weights (faster convolutions, same outputs); ``ema_std`` the weights
    of the post-hoc EMA of that length, reconstructed from the run's snapshots (diffusion/posthoc.py);
    ``part="guide"`` the guide a checkpoint's run trained alongside (model.guide) instead of its model."""
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
        unet, sched_cfg, run_cfg = _unet_from_checkpoint(p, use_ema, unet_class, ema_std, part)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet.eval(), sched_cfg, run_cfg


def _unet_from_checkpoint(
    p: Path, use_ema: bool, unet_class: type, ema_std: float | None = None, part: str = "unet"
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    ckpt = load_checkpoint(p)
    record = RunRecord.from_checkpoint(ckpt, p)
    # The model (unet.*, checkpoint["ema"]) or the guide trained alongside (guide.unet.*, ["guide_ema"]).
    config, prefix, ema_key = (
        (record.unet_config, "unet.", "ema")
        if part == "unet"
        else (record.guide_unet_config, "guide.unet.", "guide_ema")
    )
    if config is None:
        raise DifflabError(f"checkpoint {p} holds no guide trained alongside (model.guide)")
    unet = unet_class.from_config(config)
    live = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        unet.load_state_dict(live)
    except RuntimeError as e:
        raise DifflabError(
            f"checkpoint {p} does not match its own UNet config: {str(e).splitlines()[0]}"
        ) from e
    if ema_std is not None:
        _load_posthoc(unet, record.snapshots(p), int(ckpt.get("global_step", 0)), p, ema_std)
    elif use_ema and ema_key in ckpt:
        params = list(unet.parameters())
        shadow = ckpt[ema_key]["shadow_params"]
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


def configs_of(path: str | os.PathLike, key: str = "ckpt") -> tuple[dict, dict]:
    """(UNet config, noise-schedule config) of a checkpoint or exported pipeline, read without its
    weights (the checkpoint is memory-mapped), for the start-up checks; ``key`` names the setting in
    the one line said where it cannot be read."""
    path = Path(path)
    try:
        if path.is_dir():
            unet = json.loads((path / "unet" / "config.json").read_text())
            sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            return unet, sched
        record = RunRecord.peek(path)
        return dict(record.unet_config), dict(record.scheduler_config)
    except DifflabError:
        raise
    except Exception as e:  # any unreadable file, whatever library raised it
        raise DifflabError(
            f"{key}={path} is not a difflab checkpoint or exported pipeline ({type(e).__name__})"
        ) from None


def schedule_of(ckpt: str | os.PathLike) -> dict | None:
    """The noise-schedule config of a checkpoint or exported pipeline (configs_of), or None where it
    cannot be read: the run itself then says why, in one line, with its reasons."""
    try:
        return configs_of(ckpt)[1]
    except DifflabError:
        return None


# What a run of each objective may start from (model.init_from): the same objective, or for MeanFlow a
# flow model too (the same path and time scale: a flow model is a MeanFlow model at r = t).
STARTS_FROM = {"ddpm": ("ddpm",), "flow": ("flow",), "meanflow": ("flow", "meanflow")}


def init_weights(unet: torch.nn.Module, scheduler_config: dict[str, Any], path: str) -> None:
    """Copies the (EMA) UNet weights of a trained run or exported pipeline at ``path`` into ``unet``
    (model.init_from): a new run's starting point, not a resume (its step counter, optimizer and LR
    schedule start fresh). From a flow model into a MeanFlow one, the second time's embedding, which the
    flow UNet lacks, starts with a zero output layer: the new model is the flow model at r = t."""
    from difflab.diffusion.noise import objective_of  # here: diffusers is slow to import

    key = f"model.init_from={path}"
    if not Path(path).exists():  # checked here, not at start-up: a resume never reads it (train.py)
        raise DifflabError(f"{key} does not exist")
    source, theirs_cfg, _ = load_trained_unet(path, use_ema=True)
    mine, theirs = objective_of(scheduler_config), objective_of(theirs_cfg)
    if theirs not in STARTS_FROM[mine]:
        raise DifflabError(
            f"{key} is a {theirs} model; a model={mine} run starts from a "
            + " or ".join(STARTS_FROM[mine])
            + " one"
        )
    scale = ("num_train_timesteps", "prediction_type")  # the time scale and the target
    diffs = [
        f"model.noise_scheduler.{d}"
        for d in config_differences(theirs_cfg, scheduler_config, set(scale), saved_name="init_from")
    ]
    added = theirs == "flow" and mine == "meanflow"
    skip = {"class_embed_type"} if added else set()
    unet_keys = (set(source.config) | set(unet.config)) - skip
    diffs += [
        f"model.unet.{d}"
        for d in config_differences(dict(source.config), dict(unet.config), unet_keys, saved_name="init_from")
    ]
    if diffs:
        raise DifflabError(f"{key} differs from this run in " + "; ".join(diffs))
    result = unet.load_state_dict(source.state_dict(), strict=False)
    new = sorted(result.missing_keys)
    assert not result.unexpected_keys and all(k.startswith("class_embedding.") for k in new), result
    if new:
        with torch.no_grad():
            unet.class_embedding.linear_2.weight.zero_()
            unet.class_embedding.linear_2.bias.zero_()
    log.info(
        "model.init_from: UNet weights from %s%s", path, " (new: the second time's embedding)" if new else ""
    )
