"""`difflab-eval`: FID/KID of a checkpoint for samplers x steps; a JSON/CSV table and a FID-vs-steps plot.

difflab-eval ckpt=PATH samplers=[dpmsolver++,ddim] steps=[10,20,50] num_samples=1000
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from difflab.checkpoints import load_trained_unet
from difflab.config import resolve_device, run_command
from difflab.diffusion.sampling import build_sampler
from difflab.errors import DifflabError
from difflab.metrics.features import ClassifierFeatures, InceptionFeatures
from difflab.metrics.fid import FIDEvaluator, real_features

EXTRACTORS = ("classifier", "inception")


def build_extractor(cfg: DictConfig) -> torch.nn.Module:
    if cfg.extractor not in EXTRACTORS:
        raise DifflabError(f"extractor={cfg.extractor!r} is not valid; allowed: {', '.join(EXTRACTORS)}")
    if cfg.extractor == "inception":
        return InceptionFeatures(cfg.inception_weights)
    return ClassifierFeatures(cache_dir=cfg.cache_dir)


def evaluate(cfg: DictConfig) -> list[dict]:
    """One row per (sampler, steps): FID (and KID), seconds; written to ``cfg.out``."""
    if cfg.num_samples < 2:
        raise DifflabError(f"num_samples={cfg.num_samples} must be at least 2 for FID")
    device = resolve_device(cfg.device)
    unet, sched_cfg, run_cfg = load_trained_unet(
        cfg.ckpt, use_ema=cfg.use_ema, channels_last=cfg.channels_last
    )
    for name in cfg.samplers:  # build_sampler's own checks (name, schedule), before the costly setup
        build_sampler(name, sched_cfg)
    if "data" not in run_cfg:
        raise DifflabError(f"{cfg.ckpt} carries no data config; evaluate a training .ckpt, not an export")
    datamodule = hydra.utils.instantiate(OmegaConf.create(run_cfg["data"]))
    extractor = build_extractor(cfg)
    extractor.prepare(datamodule)
    feats = real_features(datamodule, extractor, cfg.num_real, cfg.cache_dir, torch.device("cpu"))
    evaluator = FIDEvaluator(extractor, cfg.num_samples, kid=cfg.kid)
    evaluator.set_real_features(feats)
    evaluator.to(torch.device(device))
    unet.to(device)
    rows = []
    for name in cfg.samplers:
        for steps in cfg.steps:
            t0 = time.perf_counter()
            values = evaluator.evaluate(unet, build_sampler(name, sched_cfg), steps, cfg.seed, cfg.batch_size)
            row = {
                "sampler": name,
                "steps": steps,
                **values,
                "seconds": round(time.perf_counter() - t0, 2),
                "extractor": extractor.identity,
                "num_samples": cfg.num_samples,
                "num_real": len(feats),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(rows, Path(cfg.out), evaluator.names()["fid"])
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


def main(argv: list[str] | None = None) -> None:
    def command(cfg: DictConfig) -> str:
        return f"{len(evaluate(cfg))} rows: {cfg.out}/results.json, results.csv, fid_vs_steps.png"

    run_command("eval", command, argv)


if __name__ == "__main__":
    main()
