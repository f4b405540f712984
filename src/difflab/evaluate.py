"""`difflab-eval`: FID/KID of a checkpoint for samplers x steps; a JSON/CSV table and a FID-vs-steps plot.

difflab-eval ckpt=PATH sampler=[dpmsolver++,ddim] steps=[10,20,50] num_samples=1000   (one table)
difflab-eval -m ckpt=PATH sampler=ddim,dpmsolver++ steps=10,20       (one table per job, out/<overrides>)
difflab-eval ckpt=PATH guide=[step:2000,ema:0.03] guidance=[1.0,1.5,2.0]   (autoguidance: fid_vs_guidance.png)
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from difflab.cli import Command, instantiate, keywords
from difflab.diffusion.guidance import GuidedUNet, guidance_problems, load_guide
from difflab.diffusion.posthoc import EMAStd
from difflab.diffusion.sampling import (
    SamplerName,
    batch_fits,
    build_sampler,
    network_evaluations,
    steps_problem,
)
from difflab.errors import DifflabError
from difflab.files import Readable, atomic_write, atomic_write_text
from difflab.inference import load_trained_unet
from difflab.metrics.fid import FIDEvaluator, kid_wanted, real_features
from difflab.precision import ChannelsLast, uses_channels_last
from difflab.rules import AtLeast, Device, Exists, OutputDir, resolve_device
from difflab.sample import sampler_steps_problems, warn_if_long

# results.json/.csv and the plots; a -m sweep's jobs write to out/<overrides>/ (Hydra's multirun.yaml beside).
RESULTS_DIR = OutputDir(
    ("results.json", "results.csv", "*.png", "*=*", "multirun.yaml"), "evaluation results"
)


def evaluate(
    ckpt: Annotated[str, Exists("file"), Readable()],
    sampler: SamplerName | list[SamplerName],
    steps: Annotated[int, AtLeast(1)] | list[Annotated[int, AtLeast(1)]],
    num_samples: Annotated[int, AtLeast(2)],
    num_real: Annotated[int, AtLeast(2)],
    extractor: nn.Module,
    cache_dir: str,
    kid: bool | Literal["auto"],
    seed: int,
    batch_size: Annotated[int, AtLeast(1)],
    out: Annotated[str, RESULTS_DIR],
    device: Annotated[str, Device()],
    use_ema: bool,
    ema_std: EMAStd | list[EMAStd] | None,
    channels_last: ChannelsLast,
    real_split: str | None = None,
    guide: str | list[str] | None = None,
    guidance: Annotated[float, AtLeast(0)] | list[Annotated[float, AtLeast(0)]] = 1.0,
) -> list[dict]:
    """One row per (EMA length, guide and guidance, sampler, steps): FID (and KID with its std over
    subsets), seconds; written to ``out`` (conf/eval.yaml documents each setting). ``extractor`` comes
    from the metrics group, as in training. ``kid="auto"``: KID beside FID when ``num_samples`` < 10,000.
    With a guide, each row also names its guide, its weight and its network evaluations per image."""
    samplers = [sampler] if isinstance(sampler, str) else list(sampler)
    step_counts = [steps] if isinstance(steps, int) else list(steps)
    ema_stds = list(ema_std) if isinstance(ema_std, list) else [ema_std]
    guides = [] if guide is None else [guide] if isinstance(guide, str) else list(guide)
    weights = [float(guidance)] if isinstance(guidance, int | float) else [float(w) for w in guidance]
    # Unguided once (w = 1 is the same images whatever the guide), then each guide at each other weight.
    settings = [(None, 1.0)] if 1.0 in weights or not guides else []
    settings += [(g, w) for g in guides for w in weights if w != 1.0]
    loaded: dict[str, nn.Module] = {}
    device = resolve_device(device)
    nhwc = uses_channels_last(channels_last, "32-true", torch.device(device).type)

    def load(std: float | None) -> tuple:
        return load_trained_unet(ckpt, use_ema=use_ema, channels_last=nhwc, ema_std=std)

    unet, sched_cfg, run_cfg = load(ema_stds[0])
    # The checks that need the model (its training schedule), before the costly set-up.
    unet.to(device)
    for name in samplers:
        scheduler = build_sampler(name, sched_cfg)
        for count in step_counts:
            if problem := steps_problem(name, sched_cfg, count):
                raise DifflabError(problem)
            with batch_fits(batch_size, device):
                warn_if_long(unet, scheduler, sched_cfg, count, num_samples, batch_size, device)
    if "data" not in run_cfg:
        raise DifflabError(f"{ckpt} carries no data config; evaluate a training .ckpt, not an export")
    reference_cfg = None if real_split is None else split_config(run_cfg["data"], real_split, ckpt)
    try:
        datamodule = instantiate(OmegaConf.create(run_cfg["data"]))
        datamodule.setup()  # opens the source: a moved folder is found here, not mid-way
    except DifflabError as e:  # it names the training run's key, which difflab-eval does not take
        raise DifflabError(
            f"the training images of {ckpt} cannot be read ({e}); eval reads them where the run "
            "read them: put them back there"
        ) from None
    extractor.prepare(datamodule)  # a classifier learns from the training images, whatever real_split
    reference = datamodule if reference_cfg is None else instantiate(reference_cfg)
    # (the classifier above learnt from the run's training split only: a held-out split stays unseen)
    feats = real_features(reference, extractor, num_real, cache_dir, torch.device("cpu"))
    evaluator = FIDEvaluator(extractor, num_samples, kid=kid_wanted(kid, num_samples))
    evaluator.set_real_features(feats)
    evaluator.to(torch.device(device))
    rows = []
    for k, std in enumerate(ema_stds):
        if k:
            unet = load(std)[0]
        unet.to(device)
        for g, w in settings:
            if g is not None and g not in loaded:
                loaded[g] = load_guide(g, ckpt, use_ema, nhwc).to(device)
            model = unet if g is None else GuidedUNet(unet, loaded[g], w)
            for name, count in ((name, count) for name in samplers for count in step_counts):
                t0, scheduler = time.perf_counter(), build_sampler(name, sched_cfg)
                with batch_fits(batch_size, device):
                    values = evaluator.evaluate(model, scheduler, count, seed, batch_size)
                guided = {}
                if guides:  # the guide's evaluations count: equal sampling cost compares this column
                    per_image = network_evaluations(scheduler, count)
                    guided = {"guide": g, "guidance": w, "evaluations": per_image * (1 if g is None else 2)}
                row = {
                    **({"ema_std": std} if std is not None else {}),
                    **guided,
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
                write_table(rows, Path(out))  # each finished row kept: Ctrl-C in hour 3 loses no FID
    fid_key = evaluator.names()["fid"]
    write_results(rows, Path(out), fid_key)
    if guides:
        best = min(rows, key=lambda r: r[fid_key])
        plot_fid_vs_guidance(rows, Path(out), fid_key)
        print(
            f"best: guide={best['guide']} guidance={best['guidance']} ({best['sampler']}, {best['steps']} "
            f"steps, {best['evaluations']} evaluations per image): {fid_key.removeprefix('val/')}="
            f"{best[fid_key]:.3f}; plot: {Path(out) / 'fid_vs_guidance.png'}"
        )
    if len(ema_stds) > 1:
        best = min(rows, key=lambda r: r[fid_key])
        plot_fid_vs_ema(rows, Path(out), fid_key)
        print(
            f"best: ema_std={best['ema_std']} ({best['sampler']}, {best['steps']} steps): "
            f"{fid_key.removeprefix('val/')}={best[fid_key]:.3f}; plot: {Path(out) / 'fid_vs_ema.png'}"
        )
    return rows


def split_config(data_cfg: dict, split: str, ckpt: str) -> DictConfig:
    """The run's data config reading another split of its source (held-out images for the reference),
    checked against the source's signature before any data is read."""
    from difflab.rules import config_problems

    source = data_cfg.get("source", {})
    if "split" not in source:
        raise DifflabError(
            f"real_split={split}: the data source of {ckpt} ({source.get('_target_')}) has no splits; "
            "leave real_split=null (the training images)"
        )
    cfg = OmegaConf.create(data_cfg)
    cfg.source.split = split
    cfg.source.max_items = None  # the whole held-out split, whatever the training run limited itself to
    problems = [p for p in config_problems(cfg.source, "source") if p.startswith("source.split=")]
    if problems:
        why = problems[0].partition(" ")[2]
        raise DifflabError(f"real_split={split} {why} (the splits of {ckpt}'s data source)")
    return cfg


def reference_split(data_cfg: dict, split: str, ckpt: str) -> object:
    """The datamodule of ``split`` of the run's data source (``split_config``), set up: a held-out
    FID reference for scripts that build their own evaluation."""
    datamodule = instantiate(split_config(data_cfg, split, ckpt))
    datamodule.setup()
    return datamodule


def save_plot(
    path: Path, curves: dict[str, list[tuple]], xlabel: str, fid_key: str, best: tuple | None = None
) -> None:
    """One figure of FID curves ({label: [(x, FID), ...]}), the ``best`` (x, FID) point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, pts in curves.items():
        ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label)
    if best is not None:
        ax.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="k", zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(fid_key.removeprefix("val/"))
    if xlabel == "sampler steps":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_fid_vs_ema(rows: list[dict], out: Path, fid_key: str) -> None:
    """FID against the post-hoc EMA length, one curve per (sampler, steps); the best point marked."""
    curves: dict[str, list[tuple]] = {}
    for r in rows:
        curves.setdefault(f"{r['sampler']}, {r['steps']} steps", []).append((r["ema_std"], r[fid_key]))
    best = min(rows, key=lambda r: r[fid_key])
    save_plot(out / "fid_vs_ema.png", curves, "post-hoc EMA length σ_rel (ema_std)", fid_key,
              (best["ema_std"], best[fid_key]))  # fmt: skip


def plot_fid_vs_guidance(rows: list[dict], out: Path, fid_key: str) -> None:
    """FID against the guidance weight, one curve per (guide, sampler, steps[, EMA length]), each
    starting from the unguided point (w = 1); the best point marked."""
    curves: dict[str, list[tuple]] = {}
    guides = [g for g in dict.fromkeys(r["guide"] for r in rows) if g is not None]
    for g in guides:
        for r in rows:
            if r["guide"] in (g, None):
                extra = "" if r.get("ema_std") is None else f", ema_std={r['ema_std']}"
                label = f"guide={g}: {r['sampler']}, {r['steps']} steps{extra}"
                curves.setdefault(label, []).append((r["guidance"], r[fid_key]))
    best = min(rows, key=lambda r: r[fid_key])
    save_plot(out / "fid_vs_guidance.png", curves, "guidance weight w (1 = unguided)", fid_key,
              (best["guidance"], best[fid_key]))  # fmt: skip


def write_table(rows: list[dict], out: Path) -> None:
    """results.json and results.csv, each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())


def write_results(rows: list[dict], out: Path, fid_key: str) -> None:
    write_table(rows, out)
    curves: dict[str, list[tuple]] = {}
    for r in rows:
        std, g = r.get("ema_std"), r.get("guide")
        label = r["sampler"] + ("" if std is None else f", ema_std={std}")
        label += "" if g is None else f", {g} w={r['guidance']}"
        curves.setdefault(label, []).append((r["steps"], r[fid_key]))
    save_plot(out / "fid_vs_steps.png", curves, "sampler steps", fid_key)


def run(cfg: DictConfig) -> list[dict]:
    kwargs = keywords(evaluate, cfg)
    rows = evaluate(**kwargs)
    print(f"{len(rows)} rows: {kwargs['out']}/results.json, results.csv, fid_vs_steps.png")
    return rows


def checks(cfg: DictConfig) -> list[str]:
    """An empty list leaves nothing to evaluate, and the feature cache must take files: both refused
    before the minutes of set-up they would cost."""
    from difflab.rundir import make_writable_dir, remove_dirs

    try:
        remove_dirs(make_writable_dir(Path(str(cfg.cache_dir)), "metrics.cache_dir"))
    except DifflabError as e:
        return [str(e)]
    samplers = list(cfg.sampler) if OmegaConf.is_list(cfg.sampler) else [cfg.sampler]
    step_counts = list(cfg.steps) if OmegaConf.is_list(cfg.steps) else [cfg.steps]
    guides = list(cfg.guide) if OmegaConf.is_list(cfg.guide) else cfg.guide
    weights = list(cfg.guidance) if OmegaConf.is_list(cfg.guidance) else cfg.guidance
    problems = sampler_steps_problems(str(cfg.ckpt), samplers, step_counts)
    problems += guidance_problems(guides, weights, str(cfg.ckpt))
    return problems + [
        f"{key}=[] is empty; give one value or a list of them ({key}={example})"
        for key, example in (
            ("sampler", "[dpmsolver++,ddim]"),
            ("steps", "[10,20]"),
            ("ema_std", "[0.05,0.1]"),
            ("guide", "[step:2000,ema:0.03]"),
            ("guidance", "[1.0,1.5,2.0]"),
        )
        if OmegaConf.is_list(cfg.get(key)) and len(cfg[key]) == 0
    ]


COMMAND = Command("eval", run, evaluate, checks)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
