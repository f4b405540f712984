"""`difflab-export`: a training checkpoint → a diffusers ``DDPMPipeline`` directory (safetensors).

difflab-export ckpt=PATH out=DIR [push_to_hub=true hub_repo_id=user/name]
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from omegaconf import DictConfig

from difflab.checkpoints import load_trained_unet
from difflab.config import run_command
from difflab.errors import DifflabError


def export(cfg: DictConfig) -> Path:
    """Write the pipeline to ``cfg.out`` (and optionally push that folder alone to the Hub)."""
    if Path(cfg.ckpt).is_dir():
        raise DifflabError(f"{cfg.ckpt} is a directory; difflab-export takes a training .ckpt file")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DifflabError(f"out={out} is an existing file; give a directory for the pipeline")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise DifflabError(
            f"out={out} is a non-empty directory that holds no exported pipeline; "
            "give a new or empty directory (an earlier export there is replaced)"
        )
    # model_index.json names each component's class: write diffusers' own UNet2DModel (difflab's
    # subclass only reads dtype faster), so the folder loads wherever diffusers does.
    unet, sched_cfg, _ = load_trained_unet(cfg.ckpt, use_ema=cfg.use_ema, unet_class=UNet2DModel)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(sched_cfg))
    pipe.save_pretrained(out, safe_serialization=True)
    if cfg.push_to_hub:
        if not cfg.hub_repo_id:
            raise DifflabError("push_to_hub=true needs hub_repo_id=<user>/<name>")
        from huggingface_hub import create_repo, upload_folder

        create_repo(cfg.hub_repo_id, private=cfg.hub_private, exist_ok=True)
        # Only the exported folder goes up; checkpoints and logs live elsewhere and never travel.
        upload_folder(repo_id=cfg.hub_repo_id, folder_path=str(out), commit_message="difflab export")
    return out


def main(argv: list[str] | None = None) -> None:
    run_command("export", lambda cfg: f"exported pipeline to {export(cfg)}", argv)


if __name__ == "__main__":
    main()
