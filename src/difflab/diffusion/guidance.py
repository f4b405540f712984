"""Autoguidance (Karras et al. 2024, arXiv 2406.02507): guiding a model with a weaker version of itself.

An unconditional model has no labels for classifier-free guidance; a *guide* (a smaller, shorter-trained
or shorter-EMA version of the same model, on the same data) takes the place of the unconditional branch:

    D(x; t) = D_guide(x; t) + w · (D_model(x; t) − D_guide(x; t)),      w = ``guidance`` (1 = off)

The blend is applied to the networks' raw outputs, in the objective's own space (ε, v, x0, flow velocity
or MeanFlow's average velocity): in each, the denoised estimate is D = a(x, t) + b(t)·output with a and b
the same for both networks, so blending outputs is exactly blending D (the paper's formulation), with no
conversion per objective and for every sampler that takes a model output.

A guide is named by ``guide=``: a checkpoint or exported pipeline, or a shorthand for this run's own
weaker versions: ``step:N`` (its checkpoint at optimizer step N), ``ema:S`` (its post-hoc EMA at
σ_rel = S, runs trained with model/ema=posthoc) or ``alongside`` (the small UNet it trained alongside,
runs trained with model/guide=tiny: diffusion/trained_guide.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from difflab.diffusion.trained_guide import ALONGSIDE
from difflab.errors import DifflabError
from difflab.inference import configs_of, load_trained_unet

STEP, EMA = re.compile(r"step:(\d+)"), re.compile(r"ema:(\S+)")
# What a guide must share with the model: the images (shape) and what the network's output means.
SAME_IMAGES = ("sample_size", "in_channels", "out_channels")
SAME_OUTPUT = ("num_train_timesteps", "prediction_type")


class GuidedUNet(nn.Module):
    """``guide + w·(unet − guide)`` with the UNet's call signature and config, so every sampler, the FID
    evaluator and difflab-sample take it unchanged. Each sampler step costs two network evaluations;
    at w = 1 it returns the model's output itself (the guide is not run: unguided, bit for bit)."""

    def __init__(self, unet: nn.Module, guide: nn.Module, weight: float) -> None:
        super().__init__()
        self.unet, self.guide, self.weight = unet, guide, float(weight)

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> UNet2DOutput:
        out = self.unet(sample, timestep, **kwargs).sample
        if self.weight == 1.0:
            return UNet2DOutput(sample=out)
        weak = self.guide(sample, timestep, **kwargs).sample
        return UNet2DOutput(sample=torch.lerp(weak, out, self.weight))


def guide_source(guide: str, ckpt: str) -> tuple[Path, float | None]:
    """(the file or folder holding the guide's weights, its post-hoc EMA length or None) for
    ``guide=`` of a model loaded from ``ckpt``; a shorthand names a file of ckpt's own run."""
    if m := STEP.fullmatch(guide):
        step = int(m.group(1))
        folder = Path(ckpt).parent
        path = folder / f"step_{step:07d}.ckpt"
        if not Path(ckpt).is_file() or not path.is_file():
            saved = sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.ckpt"))
            raise DifflabError(
                f"guide={guide}: {ckpt}'s run has no checkpoint of step {step} (saved steps: "
                f"{', '.join(map(str, saved)) or 'none'}); give one of them or a checkpoint path"
            )
        return path, None
    if m := EMA.fullmatch(guide):
        try:
            std = float(m.group(1))
        except ValueError:
            raise DifflabError(f"guide={guide}: ema:S takes a number S (the post-hoc EMA length)") from None
        if not Path(ckpt).is_file():
            raise DifflabError(f"guide={guide} needs a training checkpoint (its run's snapshots), not {ckpt}")
        return Path(ckpt), std
    path = Path(guide).expanduser()
    if not path.exists():
        raise DifflabError(
            f"guide={guide} does not exist; give a checkpoint, an exported pipeline, step:N, ema:S or "
            f"{ALONGSIDE}"
        )
    return path, None


def mismatch(key: str, theirs: tuple[dict, dict], mine: tuple[dict, dict], model: str) -> str | None:
    """One line naming what a guide (its UNet and schedule configs) differs in from ``model``, or None."""
    from difflab.diffusion.noise import objective_of

    (theirs_unet, theirs_sched), (mine_unet, mine_sched) = theirs, mine
    diffs = [
        f"{k} {theirs_unet.get(k)} (the model: {mine_unet.get(k)})"
        for k in SAME_IMAGES
        if theirs_unet.get(k) != mine_unet.get(k)
    ]
    if objective_of(theirs_sched) != objective_of(mine_sched):
        diffs.append(f"objective {objective_of(theirs_sched)} (the model: {objective_of(mine_sched)})")
    else:
        diffs += [
            f"{k} {theirs_sched.get(k)} (the model: {mine_sched.get(k)})"
            for k in SAME_OUTPUT
            if theirs_sched.get(k) != mine_sched.get(k)
        ]
    return f"{key} cannot guide {model}: it differs in " + "; ".join(diffs) if diffs else None


def guide_problem(guide: str, ckpt: str) -> str | None:
    """Why ``guide`` cannot guide the model of ``ckpt``, or None: the start-up check (weights unread)."""
    try:
        mine = configs_of(Path(ckpt), "ckpt")
    except DifflabError:
        return None  # the model's own loader says what is wrong with ckpt
    if guide == ALONGSIDE:
        from difflab.run_record import RunRecord

        if not Path(ckpt).is_file() or RunRecord.peek(ckpt).guide_unet_config is None:
            return (
                f"guide={ALONGSIDE}: {ckpt} holds no guide trained alongside (runs trained with "
                "model/guide=tiny do); give step:N, ema:S or a checkpoint path"
            )
        return None  # trained with the model: the same images and objective
    try:
        path, std = guide_source(guide, ckpt)
    except DifflabError as e:
        return str(e)
    if std is not None:
        from difflab.diffusion.posthoc import STD_RANGE
        from difflab.run_record import RunRecord

        if not STD_RANGE[0] <= std <= STD_RANGE[1]:
            return f"guide={guide}: the post-hoc EMA length must be between {STD_RANGE[0]} and {STD_RANGE[1]}"
        folder = RunRecord.peek(path).snapshots(path)
        if not any(folder.glob("phema_*.safetensors")):
            return (
                f"guide={guide}: {ckpt}'s run has no post-hoc EMA snapshots ({folder}); ema:S guides runs "
                "trained with model/ema=posthoc (others: step:N)"
            )
        return None  # the run's own model, another EMA of it
    try:
        return mismatch(f"guide={guide}", configs_of(path, "guide"), mine, ckpt)
    except DifflabError as e:
        return str(e)


def guidance_problems(guide: str | list | None, guidance: float | list, ckpt: str) -> list[str]:
    """The start-up lines for a (guide, guidance) setting or sweep of them."""
    guides = [g for g in (guide if isinstance(guide, list) else [guide]) if g is not None]
    weights = guidance if isinstance(guidance, list) else [guidance]
    if not guides and any(w != 1.0 for w in weights):
        return [
            f"guidance={weights[0] if len(weights) == 1 else weights} needs a guide: give guide=PATH, "
            f"guide=step:N, guide=ema:S or guide={ALONGSIDE} (guidance=1.0 samples unguided)"
        ]
    return [p for g in guides if (p := guide_problem(str(g), ckpt))]


def load_guide(
    guide: str, ckpt: str, use_ema: bool, channels_last: bool = False, unet_class: type | None = None
) -> nn.Module:
    """The guide network named by ``guide`` (checked by guide_problem at start-up)."""
    if guide == ALONGSIDE:
        return load_trained_unet(ckpt, use_ema, channels_last, unet_class, part="guide")[0]
    path, std = guide_source(guide, ckpt)
    return load_trained_unet(path, use_ema, channels_last, unet_class, std)[0]
