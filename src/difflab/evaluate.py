"""`difflab-eval`: FID/KID of a checkpoint for samplers x steps; a JSON/CSV table and a FID-vs-steps plot.

difflab-eval ckpt=PATH sampler=[dpmsolver++,ddim] steps=[10,20,50] num_samples=1000   (one table)
difflab-eval -m ckpt=PATH sampler=ddim,dpmsolver++ steps=10,20       (one table per job, out/<overrides>)
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Annotated

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from difflab.checkpoints import load_trained_unet
from difflab.cli import Command, instantiate, keywords
from difflab.diffusion.module import ChannelsLast, uses_channels_last
from difflab.diffusion.sampling import SamplerName, build_sampler
from difflab.errors import DifflabError
from difflab.metrics.fid import FIDEvaluator, real_features
from difflab.rules import AtLeast, Device, Exists, resolve_device


def evaluate(
    ckpt: Annotated[str, Exists("file")],
    sampler: SamplerName | list[SamplerName],
    steps: Annotated[int, AtLeast(1)] | list[Annotated[int, AtLeast(1)]],
    num_samples: Annotated[int, AtLeast(2)],
    num_real: Annotated[int, AtLeast(2)],
    extractor: nn.Module,
    cache_dir: str,
    kid: bool,
    seed: int,
    batch_size: Annotated[int, AtLeast(1)],
    out: str,
    device: Annotated[str, Device()],
    use_ema: bool,
    channels_last: ChannelsLast,
) -> list[dict]:
    """One row per (sampler, steps): FID (and KID), seconds; written to ``out`` (conf/eval.yaml
    documents each setting). ``extractor`` comes from the metrics group, as in training."""
    samplers = [sampler] if isinstance(sampler, str) else list(sampler)
    step_counts = [steps] if isinstance(steps, int) else list(steps)
    device = resolve_device(device)
    nhwc = uses_channels_last(channels_last, "32-true", torch.device(device).type)
    unet, sched_cfg, run_cfg = load_trained_unet(ckpt, use_ema=use_ema, channels_last=nhwc)
    for name in samplers:  # build_sampler's own checks (the training schedule), before the costly setup
        build_sampler(name, sched_cfg)
    if "data" not in run_cfg:
        raise DifflabError(f"{ckpt} carries no data config; evaluate a training .ckpt, not an export")
    datamodule = instantiate(OmegaConf.create(run_cfg["data"]))
    extractor.prepare(datamodule)
    feats = real_features(datamodule, extractor, num_real, cache_dir, torch.device("cpu"))
    evaluator = FIDEvaluator(extractor, num_samples, kid=kid)
    evaluator.set_real_features(feats)
    evaluator.to(torch.device(device))
    unet.to(device)
    rows = []
    for name in samplers:
        for count in step_counts:
            t0 = time.perf_counter()
            values = evaluator.evaluate(unet, build_sampler(name, sched_cfg), count, seed, batch_size)
            row = {
                "sampler": name,
                "steps": count,
                **values,
                "seconds": round(time.perf_counter() - t0, 2),
                "extractor": extractor.identity,
                "num_samples": num_samples,
                "num_real": len(feats),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(rows, Path(out), evaluator.names()["fid"])
    return rows


def write_results(rows: list[dict], out: Path, fid_key: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["steps"], r[fid_key]) for r in rows if r["sampler"] == name)
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("sampler steps")
    ax.set_ylabel(fid_key.removeprefix("val/"))
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_steps.png", dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    kwargs = keywords(evaluate, cfg)
    rows = evaluate(**kwargs)
    print(f"{len(rows)} rows: {kwargs['out']}/results.json, results.csv, fid_vs_steps.png")
    return rows


COMMAND = Command("eval", run, evaluate)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
