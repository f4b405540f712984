"""Time to quality: classifier-FID against wall time for each training recipe, same UNet, data, batch,
seeds and step budget; the diffusers example's recipe as the baseline, also as a bare PyTorch loop.

    .venv/bin/python experiments/benchmarks/time_to_quality.py                       # every row, 2 seeds
    .venv/bin/python experiments/benchmarks/time_to_quality.py --rows ddpm default --seeds 0 --train-only
    .venv/bin/python experiments/benchmarks/time_to_quality.py --rows ddpm default --seeds 0   # then evaluate
    .venv/bin/python experiments/benchmarks/time_to_quality.py --report --reference ddpm   # tabulate the done
    .venv/bin/python experiments/benchmarks/time_to_quality.py --data twemoji --rows ddpm default
    .venv/bin/python experiments/benchmarks/time_to_quality.py --rows ddpm default@600 --seeds 0 1
    .venv/bin/python experiments/benchmarks/time_to_quality.py --steps 40 --eval-every 20 --num-samples 64 \
        --num-real 256 --rows baseline default bare --seeds 0 --work /tmp/ttq_smoke    # a smoke run (~6 min)

The target of the summary is the baseline's final FID, or the first row's when the baseline is not run.
A row written ROW@STEPS trains ROW with a budget of STEPS instead of --steps: its cosine LR decays to zero
and its EMA ends there, as for a user who has that much time. A checkpoint of a longer run at STEPS is
still mid-schedule, so it understates what STEPS steps buy.

Each row trains with the real `difflab-train` (checkpoints every --eval-every steps, nothing else in
the process), then `difflab-eval` measures every checkpoint at 20 sampler steps and the last one also at
10 (dpmsolver++, which samples both objectives), against the test split (Fashion-MNIST) or the training
images (twemoji, which has no split; its classifier is trained label-free); the `posthoc` row's checkpoints
at each of --posthoc-stds post-hoc EMA lengths, its point the best. The wall time of a point is
the time from launching the training command to that checkpoint's file, start-up included: what a user
waits. The bare loop
is the diffusers example's training loop written out (UNet2DModel, DDPMScheduler, AdamW, cosine
warm-up, EMAModel, clipping) on the same tensors, evaluated with the same FID code in-process.
Results accumulate in --work (a rerun skips what is done); prints markdown tables for RESULTS.md
and writes fid_vs_time.png (fid_vs_time_twemoji.png) next to this script.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent

# The diffusers example (train_unconditional.py) as difflab overrides: AdamW lr 1e-4, betas (0.95,
# 0.999), weight decay 1e-6, cosine with 500 warm-up steps, clipping at 1.0, linear betas over 1,000
# steps, epsilon prediction, EMA inv_gamma 1.0 / power 0.75 / max decay 0.9999.
DIFFUSERS = [
    "model.optimizer.lr=1e-4",
    "model.optimizer.betas=[0.95,0.999]",
    "model.optimizer.weight_decay=1e-6",
    "model.lr_schedule=cosine",
    "model.warmup_steps=500",
    "trainer.gradient_clip_val=1.0",
    "model.noise_scheduler.beta_schedule=linear",
    "model.noise_scheduler.prediction_type=epsilon",
    "model.ema.inv_gamma=1.0",
    "model.ema.power=0.75",
    "model.ema.max_decay=0.9999",
]
# difflab's default job before issue 14: DDPM (lr 1e-3, 100 warm-up steps, epsilon, uniform timesteps)
# in fp32 (its precision then; today's default picks bf16 where the hardware runs it fast).
OLD_DEFAULT = ["model=ddpm", "trainer.precision=32-true"]
# Each lever alone on "ddpm", the old default, then combined; "default" is whatever the default job is now.
ROWS: dict[str, list[str]] = {
    "baseline": [*OLD_DEFAULT, *DIFFUSERS],  # the example trains in fp32 by default (--mixed_precision no)
    "ddpm": OLD_DEFAULT,
    "default_fp32": ["trainer.precision=32-true"],
    "default": [],
    "min_snr": [*OLD_DEFAULT, "model.min_snr_gamma=5"],
    "v_pred": [*OLD_DEFAULT, "model.noise_scheduler.prediction_type=v_prediction"],
    "v_pred_min_snr": [
        *OLD_DEFAULT,
        "model.noise_scheduler.prediction_type=v_prediction",
        "model.min_snr_gamma=5",
    ],
    "immiscible": [*OLD_DEFAULT, "model.immiscible=true"],
    "flow_shift1": ["model=flow", "model.noise_scheduler.shift=1.0"],  # sampled without the shift
    "flow_uniform": ["model=flow", "model.timesteps=uniform"],
    "flow_immiscible": ["model=flow", "model.immiscible=true"],
    "flow_lr2x": ["model=flow", "model.optimizer.lr=2e-3"],
    "flow_lr_half": ["model=flow", "model.optimizer.lr=5e-4"],
    "flow_stratified": ["model=flow", "model.stratified=true"],
    "flow_min_snr": ["model=flow", "model.min_snr_gamma=5"],
    "flow_noclip": ["model=flow", "trainer.gradient_clip_val=null"],
    "flow_learned": ["model=flow", "model.learned_weighting=true"],
    "flow_learned_noclip": ["model=flow", "model.learned_weighting=true", "trainer.gradient_clip_val=null"],
    "posthoc": ["model/ema=posthoc"],  # the default with EDM2's post-hoc EMA: each point at its best length
}
# The post-hoc EMA lengths (σ_rel) each checkpoint of the `posthoc` row is reconstructed at; its point is
# the best of them (what a user who picks the length after training gets; --posthoc-stds replaces them).
POSTHOC_STDS = [0.05, 0.10, 0.20]
SAMPLER, STEPS = "dpmsolver++", [10, 20]  # --sampler-steps replaces STEPS
# The FID reference per --data: its test split, or its training images where it has no split (twemoji's
# 4,009 emoji leave too few for a held-out reference of 128-d features).
HELD_OUT = {"fashion_mnist": "test", "twemoji": None}


def parse_row(spec: str, default_steps: int) -> tuple[str, int]:
    """``ROW`` or ``ROW@STEPS`` -> (row, step budget)."""
    name, _, steps = spec.partition("@")
    if name not in [*ROWS, "bare"] or (steps and not steps.isdigit()) or (steps and name == "bare"):
        raise ValueError(f"row {spec!r}: expected ROW or ROW@STEPS with ROW one of {[*ROWS, 'bare']}")
    return name, int(steps) if steps else default_steps


def points_file(work: Path, spec: str, seed: int) -> Path:
    """Where a (row, seed)'s evaluated points are kept: its presence means the pair is done."""
    name, _, steps = spec.partition("@")
    return work / (f"{name}_{steps}steps_seed{seed}" if steps else f"{name}_seed{seed}") / "points.json"


def train_row(spec: str, seed: int, opts: argparse.Namespace, work: Path) -> list[dict]:
    """Train one (row, seed); one point per checkpoint: step, wall seconds, FID at 10 and 20 steps."""
    name, budget = parse_row(spec, opts.steps)
    done = points_file(work, spec, seed)
    run = done.parent
    if done.is_file():
        return json.loads(done.read_text())
    launched, last = run / "launched.json", run / "checkpoints" / f"step_{budget:07d}.ckpt"
    if not (launched.is_file() and last.is_file()):  # trained to the end: only its evaluation is left
        train(name, budget, seed, opts, run, launched)
    if opts.train_only:
        return []
    t0 = json.loads(launched.read_text())["t0"]
    points = []
    ckpts = sorted((run / "checkpoints").glob("step_*.ckpt"), key=lambda c: int(c.stem.split("_")[1]))
    for ckpt in ckpts:
        step = int(ckpt.stem.split("_")[1])
        # Every --sampler-steps count at the end of the budget; along the way only 20 (the compared one).
        counts = STEPS if ckpt == ckpts[-1] else [20]
        stds = opts.posthoc_stds if name == "posthoc" else []
        fid = evaluate(ckpt, opts, work, run / "eval" / ckpt.stem, counts, stds)
        points.append({"step": step, "seconds": ckpt.stat().st_mtime - t0, **fid})
        print(spec, seed, points[-1], flush=True)
    done.write_text(json.dumps(points))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # the figures are kept; the weights need not be
        ckpt.unlink()
    return points


def train(name: str, budget: int, seed: int, opts: argparse.Namespace, run: Path, launched: Path) -> None:
    """The row's `difflab-train`, its launch time kept in ``launched`` (the clock of every point)."""
    if run.exists():
        shutil.rmtree(run)  # a half-finished run: its timings would be wrong
    every = opts.eval_every if budget % opts.eval_every == 0 else budget  # else one point, at its end
    args = [
        f"data={opts.data}",
        *ROWS[name],
        f"seed={seed}",
        f"trainer.max_steps={budget}",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.sample_grid=null",
        "logger=none",
        f"hydra.run.dir={run}",
    ]
    t0 = time.time()
    subprocess.run([str(BIN / "difflab-train"), *args], cwd=run.parent, check=True, capture_output=True)
    launched.write_text(json.dumps({"t0": t0}))


def evaluate(
    ckpt: Path, opts: argparse.Namespace, work: Path, out: Path, counts: list[int], ema_stds: list[float]
) -> dict[str, float]:
    """FID per sampler-step count; with ``ema_stds`` (post-hoc EMA lengths), the best length's and which."""
    steps = "[" + ",".join(map(str, counts)) + "]"
    lengths = ["ema_std=[" + ",".join(map(str, ema_stds)) + "]"] if ema_stds else []
    subprocess.run(
        [
            str(BIN / "difflab-eval"),
            f"ckpt={ckpt}",
            f"sampler={SAMPLER}",
            f"steps={steps}",
            f"num_samples={opts.num_samples}",
            f"num_real={opts.num_real}",
            # Held-out images where the set has them: a recipe cannot score by copying its training set.
            f"real_split={HELD_OUT[opts.data] or 'null'}",
            f"out={out}",
            *lengths,
        ],
        cwd=work,
        check=True,
        capture_output=True,
    )
    rows = json.loads((out / "results.json").read_text())
    key = next(k for k in rows[0] if k.startswith("val/fid_"))
    fid = {}
    for count in counts:
        best = min((r for r in rows if r["steps"] == count), key=lambda r: r[key])
        fid[f"fid{count}"] = best[key]
        if "ema_std" in best:
            fid[f"ema_std{count}"] = best["ema_std"]
    return fid


def bare_loop(seed: int, opts: argparse.Namespace, work: Path) -> list[dict]:
    """The diffusers example's loop on the default job's images and UNet, FID from difflab's code."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from difflab.cli import register_resolvers
    from difflab.config import CONF_DIR
    from difflab.diffusion.sampling import build_sampler
    from difflab.evaluate import reference_split
    from difflab.metrics.fid import FIDEvaluator, real_features

    done = points_file(work, "bare", seed)
    if done.is_file():
        return json.loads(done.read_text())
    done.parent.mkdir(parents=True, exist_ok=True)
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        overrides = [f"data={opts.data}", f"seed={seed}", f"paths.output_dir={done.parent}"]
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(seed)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    images = torch.cat(list(datamodule.real_images(len(datamodule.train_set), 4096))) * 2 - 1
    unet_cfg = {k: v for k, v in dict(cfg.model.unet).items() if k != "_target_"}
    unet = UNet2DModel(**unet_cfg)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
    )
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=opts.steps)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    batch = int(cfg.data.batch_size)
    extractor = instantiate(cfg.metrics.extractor)
    extractor.prepare(datamodule)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    held_out = reference_split(data_cfg, HELD_OUT[opts.data], "bare") if HELD_OUT[opts.data] else datamodule
    feats = real_features(held_out, extractor, opts.num_real, cfg.metrics.cache_dir, torch.device("cpu"))
    # The clock starts after the data and the FID features are ready (difflab's rows include their
    # start-up): the comparison favours the bare loop slightly.
    t0 = time.time()
    points, step, eval_seconds = [], 0, 0.0
    while step < opts.steps:
        for idx in torch.randperm(len(images)).split(batch):
            if len(idx) < batch or step >= opts.steps:
                continue
            x0 = images[idx]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,))
            pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(unet.parameters())
            step += 1
            if step % opts.eval_every == 0:
                seconds = time.time() - t0 - eval_seconds  # training time only, as for the difflab rows
                e0 = time.time()
                ema_unet = UNet2DModel(**unet_cfg)
                ema.copy_to(ema_unet.parameters())
                ema_unet.eval()
                evaluator = FIDEvaluator(extractor, opts.num_samples)
                evaluator.set_real_features(feats)
                fid = {}
                for count in STEPS:
                    sampler = build_sampler(SAMPLER, dict(noise_scheduler.config))
                    values = evaluator.evaluate(ema_unet, sampler, count, 1234, 250)
                    fid[f"fid{count}"] = next(v for k, v in values.items() if k.startswith("val/fid_"))
                eval_seconds += time.time() - e0
                points.append({"step": step, "seconds": seconds, **fid})
                print("bare", seed, points[-1], flush=True)
    done.write_text(json.dumps(points))
    return points


def first_reaching(points: list[dict], target: float, key: str = "fid20") -> dict | None:
    return next((p for p in points if p[key] <= target), None)


def summarise(results: dict[str, dict[int, list[dict]]], opts: argparse.Namespace) -> None:
    import statistics

    def median_curve(name: str) -> list[dict]:
        runs = list(results[name].values())
        out = []
        for k in range(min(len(r) for r in runs)):
            out.append(
                {
                    "step": runs[0][k]["step"],
                    "seconds": statistics.median(r[k]["seconds"] for r in runs),
                    **{
                        f"fid{n}": statistics.median(r[k].get(f"fid{n}", math.nan) for r in runs)
                        for n in (10, 20)
                    },
                }
            )
        return out

    curves = {name: median_curve(name) for name in results}
    reference = opts.reference or ("baseline" if "baseline" in curves else next(iter(curves)))
    target = curves[reference][-1]["fid20"]
    seeds = sorted({s for r in results.values() for s in r})
    print(
        f"\n{opts.steps} steps (ROW@STEPS: STEPS), small UNet, data={opts.data}, batch 32, seeds {seeds} "
        "(medians), "
        f"classifier-FID of {opts.num_samples} {SAMPLER} samples; target = {reference}'s final FID "
        f"at 20 steps ({target:.2f})\n"
    )
    budget = curves[reference][-1]["seconds"]  # the reference's wall time for the whole budget
    print(
        f"| recipe | seeds | steps to target | minutes to target | ÷ {reference}'s time "
        "| per seed (same seed's target and time) | best FID (20 steps) | final FID 10 / 20 steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, curve in curves.items():
        hit = first_reaching(curve, target)
        reach = (
            (f"{hit['step']}", f"{hit['seconds'] / 60:.1f}", f"{hit['seconds'] / budget:.2f}")
            if hit
            else ("not reached", "-", "-")
        )
        # Seeds paired: a row's seed s against the reference's seed s (its target and its time, measured in
        # the same session), so that the VM's drift between sessions cancels.
        paired = []
        for seed, points in sorted(results[name].items()):
            ref = results[reference].get(seed)
            if ref:
                hit_s = first_reaching(points, ref[-1]["fid20"])
                paired.append(f"{hit_s['seconds'] / ref[-1]['seconds']:.2f}" if hit_s else "not reached")
        best, last = min(p["fid20"] for p in curve), curve[-1]
        fid10 = "-" if math.isnan(last["fid10"]) else f"{last['fid10']:.2f}"  # --sampler-steps 20 alone
        final = f"{fid10} / {last['fid20']:.2f}"
        cells = [name, str(len(results[name])), *reach, ", ".join(paired) or "-", f"{best:.2f}", final]
        print(f"| {' | '.join(cells)} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([p["seconds"] / 60 for p in curve], [p["fid20"] for p in curve], marker="o", label=name)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("wall time (minutes, 2 CPU cores)")
    ax.set_ylabel(f"classifier-FID ({SAMPLER}, 20 steps)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(opts.plot, dpi=120)
    print(f"\nplot: {opts.plot}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows",
        nargs="+",
        default=[*ROWS, "bare"],
        help=f"ROW or ROW@STEPS (a budget), ROW one of {[*ROWS, 'bare']}",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=2000, help="step budget of every run (the default job's)")
    ap.add_argument("--eval-every", type=int, default=500, help="a FID point every N steps")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--sampler-steps", nargs="+", type=int, default=STEPS, help="FID at these sampler steps")
    ap.add_argument("--num-real", type=int, default=10000)
    ap.add_argument("--data", default="fashion_mnist", choices=list(HELD_OUT), help="the data= of every run")
    ap.add_argument("--work", default=None, help="results accumulate here (default /tmp/difflab_ttq_<data>)")
    ap.add_argument("--plot", default=None, help="default: fid_vs_time[_<data>].png next to this script")
    ap.add_argument(
        "--reference", default=None, help="the row whose final FID is the target (default baseline)"
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="tabulate the (row, seed) runs already evaluated in --work, train and evaluate nothing",
    )
    ap.add_argument(
        "--train-only",
        action="store_true",
        help="train every row, evaluate nothing: a later run evaluates them while other work may share the "
        "machine (only training is timed); the bare loop evaluates as it trains either way (untimed)",
    )
    ap.add_argument(
        "--posthoc-stds", nargs="+", type=float, default=POSTHOC_STDS, help="EMA lengths of the posthoc row"
    )
    opts = ap.parse_args()
    if opts.steps % opts.eval_every:
        ap.error("--steps must be a multiple of --eval-every")
    STEPS[:] = opts.sampler_steps
    if 20 not in STEPS:
        ap.error("--sampler-steps must include 20 (the steps the summary compares at)")
    for spec in opts.rows:
        try:
            parse_row(spec, opts.steps)
        except ValueError as err:
            ap.error(str(err))
    if opts.reference and opts.reference not in opts.rows:
        ap.error(f"--reference {opts.reference} is not one of --rows")
    suffix = "" if opts.data == "fashion_mnist" else f"_{opts.data}"
    opts.plot = opts.plot or str(HERE / f"fid_vs_time{suffix}.png")
    work = Path(opts.work or f"/tmp/difflab_ttq_{opts.data}")
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    results: dict[str, dict[int, list[dict]]] = {}
    for name in opts.rows:
        for seed in opts.seeds:
            if opts.report:  # rows may have different seed counts (medians over what each has)
                done = points_file(work, name, seed)
                if done.is_file():
                    results.setdefault(name, {})[seed] = json.loads(done.read_text())
                continue
            points = bare_loop(seed, opts, work) if name == "bare" else train_row(name, seed, opts, work)
            results.setdefault(name, {})[seed] = points
    if opts.train_only:
        return
    if opts.report and opts.reference and opts.reference not in results:
        sys.exit(f"--report: no evaluated run of --reference {opts.reference} in {work}")
    assert all(not math.isnan(p["fid20"]) for r in results.values() for ps in r.values() for p in ps)
    summarise(results, opts)


if __name__ == "__main__":
    main()
