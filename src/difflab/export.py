"""`difflab-export`: a training checkpoint → a diffusers ``DDPMPipeline`` directory (safetensors).

difflab-export ckpt=PATH out=DIR [push_to_hub=true hub_repo_id=user/name]
difflab-export ckpt=PATH out=DIR guide=step:2000 guidance=2.0      (an autoguided pipeline, both UNets)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from diffusers import DDPMPipeline, UNet2DModel
from omegaconf import DictConfig

from difflab.cli import Command, keywords
from difflab.diffusion.guidance import guidance_problems, load_guide
from difflab.diffusion.noise import objective_of, scheduler_class
from difflab.diffusion.posthoc import EMAStd
from difflab.errors import DifflabError
from difflab.files import Readable, atomic_dir
from difflab.inference import load_trained_unet
from difflab.rules import AtLeast, Exists, OutputDir

# What DiffusionPipeline.save_pretrained writes (and a custom pipeline's code): an earlier export there is
# replaced whole.
PIPELINE_DIR = OutputDir(
    ("model_index.json", "unet", "guide", "scheduler", "pipeline.py", "README.md"), "an exported pipeline"
)


def export(
    ckpt: Annotated[str, Exists("file"), Readable()],
    out: Annotated[str, PIPELINE_DIR],
    use_ema: bool,
    ema_std: EMAStd | None,
    push_to_hub: bool,
    hub_repo_id: str | None,
    hub_private: bool,
    guide: str | None,
    guidance: Annotated[float, AtLeast(0)],
) -> Path:
    """Write the pipeline to ``out`` (and optionally push that folder alone to the Hub)."""
    # model_index.json names each component's class: write diffusers' own UNet2DModel (difflab's
    # subclass only reads dtype faster), so the folder loads wherever diffusers does.
    unet, sched_cfg, _ = load_trained_unet(ckpt, use_ema=use_ema, unet_class=UNet2DModel, ema_std=ema_std)
    weak = load_guide(guide, ckpt, use_ema, unet_class=UNet2DModel) if guide is not None else None
    if objective_of(sched_cfg) == "meanflow" or weak is not None:
        write_difflab_pipeline(unet, sched_cfg, out, weak, guidance)
    else:
        # DDPMPipeline's loop (noise, then step() over the timesteps) runs a flow model with diffusers'
        # flow Euler scheduler as well: the export of either objective loads with from_pretrained.
        scheduler = scheduler_class(objective_of(sched_cfg)).from_config(sched_cfg)
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        with atomic_dir(out) as partial:  # a kill mid-write leaves no half pipeline, a rerun no litter
            pipe.save_pretrained(partial, safe_serialization=True)
    if push_to_hub:
        push(Path(out), hub_repo_id, hub_private)
    return Path(out)


def write_difflab_pipeline(
    unet: UNet2DModel, sched_cfg: dict, out: str, guide: UNet2DModel | None = None, guidance: float = 1.0
) -> None:
    """A folder DDPMPipeline cannot run (a MeanFlow model: its loop has no second time input; an
    autoguided one: two UNets): diffusers' UNet2DModel(s), the scheduler, ``guidance`` in
    model_index.json, and difflab's pipeline class as ``pipeline.py`` (diffusion/pipeline.py, torch and
    diffusers only). diffusers loads it with ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR,
    trust_remote_code=True)`` (the code is the folder's own pipeline.py). A MeanFlow model's scheduler is
    diffusers' flow scheduler carrying T, its config the model's (``objective: meanflow``, which
    difflab-sample reads); model_index.json says ``meanflow: true`` to the pipeline."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from difflab.diffusion import pipeline

    meanflow = objective_of(sched_cfg) == "meanflow"
    if meanflow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"])
    else:
        scheduler = scheduler_class(objective_of(sched_cfg)).from_config(sched_cfg)
    pipe = pipeline.DifflabPipeline(
        unet=unet, scheduler=scheduler, guide=guide, guidance=guidance, meanflow=meanflow
    )
    with atomic_dir(out) as partial:  # a kill mid-write leaves no half pipeline, a rerun no litter
        pipe.save_pretrained(partial, safe_serialization=True)
        if meanflow:
            sched_path = Path(partial) / "scheduler" / "scheduler_config.json"
            sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), **sched_cfg}, indent=2))
        (Path(partial) / "pipeline.py").write_text(Path(pipeline.__file__).read_text())


def push(out: Path, repo_id: str, private: bool) -> None:
    """Upload the exported folder (only it: checkpoints and logs live elsewhere and never travel)."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, private=private, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="difflab export")
    except Exception as e:
        # The Hub's refusals (token, permission, repo name) and the HTTP client's network errors; their
        # classes vary with huggingface_hub's HTTP backend, so they are told apart by their module.
        library = type(e).__module__.split(".")[0]
        if not isinstance(e, OSError) and library not in ("huggingface_hub", "httpx", "httpx2", "requests"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DifflabError(
            f"push_to_hub: uploading {out} to hub_repo_id={repo_id} failed ({first}); the pipeline is "
            f"saved in {out}: fix the cause and rerun, or upload it with `hf upload {repo_id} {out}`"
        ) from None


def checks(cfg: DictConfig) -> list[str]:
    problems = guidance_problems(cfg.guide, cfg.guidance, str(cfg.ckpt))
    if problems or not cfg.push_to_hub:
        return problems
    if not cfg.hub_repo_id:
        return ["push_to_hub=true needs hub_repo_id=<user>/<name>"]
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(cfg.hub_repo_id)  # the Hub's own rule for names, before minutes of export
    except HFValidationError as e:
        return [f"hub_repo_id={cfg.hub_repo_id} is not a valid Hub repo id: {str(e).splitlines()[0]}"]
    if get_token() is None:  # refused here, not after the export, when the upload would fail
        return ["push_to_hub=true needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"]
    return []


def run(cfg: DictConfig) -> Path:
    out = export(**keywords(export, cfg))
    print(f"exported pipeline to {out}")
    return out


COMMAND = Command("export", run, export, checks)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
