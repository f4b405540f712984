"""Checkpoint files: atomic writes, safe loading, finding `last`, and resume compatibility checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from difflab.errors import DifflabError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``path.tmp`` then renames it over ``path``: a crash mid-save never corrupts a checkpoint.

    Lightning's TorchCheckpointIO streams straight into the final file, so a kill during the write
    leaves a truncated ``last.ckpt``; ``os.replace`` is atomic on POSIX file systems.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote file systems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a difflab checkpoint on CPU with ``weights_only=True`` (no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, wrong file type
        raise DifflabError(
            f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}".split("\n")[0]
        ) from e
    if not isinstance(ckpt, dict) or "difflab" not in ckpt or "state_dict" not in ckpt:
        raise DifflabError(f"{path} is not a difflab training checkpoint (no 'difflab' metadata)")
    return ckpt


def find_last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run dir (``checkpoints/*.ckpt`` or Lightning's SLURM ``hpc_ckpt_*``)."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    # last.ckpt wins a tie: it is written right after the step checkpoint of the same step.
    found.sort(key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"))
    return found[-1] if found else None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | os.PathLike) -> str | None:
    """``null``: fresh start; ``last``: newest checkpoint of this run dir (or fresh); else a file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = find_last_checkpoint(run_dir)
        return str(found) if found else None
    if not Path(ckpt_path).is_file():
        raise DifflabError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or ckpt_path=last")
    return str(ckpt_path)


def _differences(saved: dict[str, Any], current: dict[str, Any], keys: set[str] | None = None) -> list[str]:
    keys = keys or (set(saved) | set(current))
    out = []
    for k in sorted(keys):
        if k.startswith("_"):
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{k} (checkpoint {a!r}, config {b!r})")
    return out


def check_resume_compatible(
    ckpt: dict[str, Any], unet_config: dict[str, Any], scheduler_config: dict[str, Any], path: str = ""
) -> None:
    """Refuse to resume when the network or the noise schedule differs from the checkpoint's."""
    meta = ckpt["difflab"]
    diffs = [f"model.unet.{d}" for d in _differences(meta["unet_config"], unet_config)]
    sched_keys = {
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "prediction_type",
        "rescale_betas_zero_snr",
    }
    diffs += [
        f"model.noise_scheduler.{d}"
        for d in _differences(meta["scheduler_config"], scheduler_config, sched_keys)
    ]
    if diffs:
        raise DifflabError(
            f"cannot resume from {path}: the config differs from the checkpoint in "
            + "; ".join(diffs)
            + ". Use the checkpoint's settings (see its run dir's config.yaml) or start a new run"
        )


def load_trained_unet(
    path: str | os.PathLike,
    use_ema: bool = True,
    channels_last: bool = False,
    unet_class: type | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(UNet with EMA weights, noise-scheduler config, run config) from a training checkpoint or an
    exported diffusers pipeline directory. ``unet_class`` defaults to difflab's ``UNet2DModel``;
    ``channels_last`` gives NHWC weights (faster convolutions, same outputs)."""
    from diffusers import DDPMScheduler

    from difflab.diffusion.unet import UNet2DModel

    unet_class = unet_class or UNet2DModel
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
            raise DifflabError(
                f"{p} is neither a checkpoint file nor an exported pipeline (no model_index.json)"
            )
        unet = unet_class.from_pretrained(p / "unet")
        sched_cfg, run_cfg = dict(DDPMScheduler.from_pretrained(p / "scheduler").config), {}
    else:
        unet, sched_cfg, run_cfg = _unet_from_checkpoint(p, use_ema, unet_class)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet.eval(), sched_cfg, run_cfg


def _unet_from_checkpoint(
    p: Path, use_ema: bool, unet_class: type
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    ckpt = load_checkpoint(p)
    meta = ckpt["difflab"]
    unet = unet_class.from_config(meta["unet_config"])
    live = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    try:
        unet.load_state_dict(live)
    except RuntimeError as e:
        raise DifflabError(
            f"checkpoint {p} does not match its own UNet config: {str(e).splitlines()[0]}"
        ) from e
    if use_ema and "ema" in ckpt:
        params = list(unet.parameters())
        shadow = ckpt["ema"]["shadow_params"]
        if len(shadow) != len(params) or any(a.shape != b.shape for a, b in zip(shadow, params, strict=True)):
            raise DifflabError(f"checkpoint {p}: EMA weights do not match the UNet")
        with torch.no_grad():
            for dst, src in zip(params, shadow, strict=True):
                dst.copy_(src)
    return unet, dict(meta["scheduler_config"]), meta.get("config", {})
