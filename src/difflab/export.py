"""`difflab-export`: a training checkpoint → a diffusers ``DDPMPipeline`` directory (safetensors).

difflab-export ckpt=PATH out=DIR [push_to_hub=true hub_repo_id=user/name]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from diffusers import DDPMPipeline, UNet2DModel
from omegaconf import DictConfig

from difflab.checkpoints import load_trained_unet
from difflab.cli import Command, keywords
from difflab.diffusion.noise import objective_of, scheduler_class
from difflab.diffusion.posthoc import EMAStd
from difflab.rules import Exists


@dataclass(frozen=True)
class PipelineDir:
    """Where an export may go: a new or empty directory, or an earlier export (which is replaced)."""

    def problem(self, value: Any) -> str | None:
        out = Path(str(value))
        if out.exists() and not out.is_dir():
            return "is an existing file; give a directory for the pipeline"
        if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
            return (
                "is a non-empty directory that holds no exported pipeline; "
                "give a new or empty directory (an earlier export there is replaced)"
            )
        return None


def export(
    ckpt: Annotated[str, Exists("file")],
    out: Annotated[str, PipelineDir()],
    use_ema: bool,
    ema_std: EMAStd | None,
    push_to_hub: bool,
    hub_repo_id: str | None,
    hub_private: bool,
) -> Path:
    """Write the pipeline to ``out`` (and optionally push that folder alone to the Hub)."""
    # model_index.json names each component's class: write diffusers' own UNet2DModel (difflab's
    # subclass only reads dtype faster), so the folder loads wherever diffusers does.
    unet, sched_cfg, _ = load_trained_unet(ckpt, use_ema=use_ema, unet_class=UNet2DModel, ema_std=ema_std)
    # DDPMPipeline's loop (noise, then step() over the timesteps) runs a flow model with diffusers'
    # flow Euler scheduler as well: the export of either objective loads with from_pretrained.
    scheduler = scheduler_class(objective_of(sched_cfg)).from_config(sched_cfg)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    if push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        create_repo(hub_repo_id, private=hub_private, exist_ok=True)
        # Only the exported folder goes up; checkpoints and logs live elsewhere and never travel.
        upload_folder(repo_id=hub_repo_id, folder_path=str(out), commit_message="difflab export")
    return Path(out)


def checks(cfg: DictConfig) -> list[str]:
    return (
        ["push_to_hub=true needs hub_repo_id=<user>/<name>"]
        if cfg.push_to_hub and not cfg.hub_repo_id
        else []
    )


def run(cfg: DictConfig) -> Path:
    out = export(**keywords(export, cfg))
    print(f"exported pipeline to {out}")
    return out


COMMAND = Command("export", run, export, checks)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
