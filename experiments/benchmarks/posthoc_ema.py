"""Post-hoc EMA under the protocol (PROTOCOL.md / protocol.py): is the EMA length chosen after training
better than the run's own training-time EMA, on images neither choice has seen?

    .venv/bin/python experiments/benchmarks/posthoc_ema.py --work /tmp/difflab_ttq_fashion_mnist
    .venv/bin/python experiments/benchmarks/posthoc_ema.py --report

Reads the ``posthoc_bf16`` runs that time_to_quality.py trains (the default job with model/ema=posthoc,
bf16-mixed; 3 seeds, the same --work) at the end of their budget. For each seed it reconstructs the EMA
at each --stds length (σ_rel) from the run's snapshots and also loads the run's training-time EMA
(model.ema.sample_std), samples --num-samples images at 20 DPM-Solver++ steps (the same image seeds for
every length) and scores them with classifier-FID and KID against each half of Fashion-MNIST's test split
(--num-real images, split into two disjoint halves A and B). The length is chosen on half A and its FID
reported on half B (and the reverse, a second estimate): a length picked and scored on the same images
would flatter post-hoc EMA by the choice's own noise.

In-process with difflab's library (inference.load_trained_unet, metrics.fid, diffusion.sampling); --code
DIR imports difflab from DIR/src instead (the frozen tree the runs were trained with). Raw records via
protocol.Recorder("posthoc_ema"); --report writes the "posthoc_ema" block of RESULTS.md and fid_vs_ema.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from protocol import RAW, Recorder, claim, interval, load, machine_line, table, write_section  # noqa: E402

BENCH = "posthoc_ema"
SAMPLER, STEPS, EVAL_SEED = "dpmsolver++", 20, 1234
STDS = [0.05, 0.10, 0.15, 0.20]
HALVES = ("A", "B")


# ----------------------------------------------------------------------------------------------- measurement


def session(run: Path, work: Path) -> tuple[dict, str]:
    """launched.json and the training session's name (time_to_quality.py's rule)."""
    launched = json.loads((run / "launched.json").read_text())
    return launched, launched.get("invocation") or f"work:{work.resolve()}"


def measure_seed(seed: int, opts: argparse.Namespace, rec: Recorder, done: set[tuple]) -> None:
    """Every EMA variant of one seed's run against both halves of the held-out reference."""
    import torch
    from omegaconf import OmegaConf

    from difflab.cli import instantiate
    from difflab.diffusion.sampling import build_sampler, sample_images
    from difflab.evaluate import reference_split
    from difflab.inference import load_trained_unet
    from difflab.metrics.fid import FIDEvaluator, real_features

    work = Path(opts.work)
    run = work / f"{opts.row}_seed{seed}"
    ckpt = run / "checkpoints" / f"step_{opts.steps:07d}.ckpt"
    if not ((run / "launched.json").is_file() and ckpt.is_file()):
        print(f"{run.name}: not trained to step {opts.steps} yet; skipped", flush=True)
        return
    launched, training = session(run, work)
    _, sched_cfg, run_cfg = load_trained_unet(ckpt, use_ema=True)
    sample_std = run_cfg["model"]["ema"].get("sample_std")  # None: a standard EMA (a smoke run)
    variants = [("training", None), *((f"{s:g}", s) for s in opts.stds)]
    todo = [(label, std) for label, std in variants if (training, seed, label) not in done]
    if not todo:
        return
    ext_cfg = OmegaConf.create(run_cfg["metrics"]["extractor"])
    ext_cfg.cache_dir = opts.cache_dir
    extractor = instantiate(ext_cfg)
    datamodule = instantiate(OmegaConf.create(run_cfg["data"]))
    datamodule.setup()
    extractor.prepare(datamodule)  # the classifier learns from the training images, as in difflab-eval
    reference = reference_split(run_cfg["data"], "test", str(ckpt))
    feats = real_features(reference, extractor, opts.num_real, opts.cache_dir, torch.device("cpu"))
    half = len(feats) // 2
    refs = {"A": feats[:half], "B": feats[half:]}  # images [0, n/2) and [n/2, n): disjoint
    for label, std in todo:
        t0 = time.time()
        unet = load_trained_unet(ckpt, use_ema=True, ema_std=std)[0]
        evaluators = {}
        for name, ref in refs.items():
            ev = FIDEvaluator(extractor, opts.num_samples, kid=True)
            ev.set_real_features(ref)
            ev.fid.reset()
            ev.kid.reset()
            evaluators[name] = ev
        sampler = build_sampler(SAMPLER, sched_cfg)
        with torch.no_grad():
            for _, images in sample_images(unet, sampler, opts.num_samples, EVAL_SEED, STEPS, 250):
                for ev in evaluators.values():  # the same images against both halves
                    ev.fid.update(images, real=False)
                    ev.kid.update(images, real=False)
        for name, ev in evaluators.items():
            kid_mean, kid_std = ev.kid.compute()
            rec.record(
                kind="point",
                row=opts.row,
                seed=seed,
                ema=label,
                ema_std=sample_std if std is None else std,
                half=name,
                fid=float(ev.fid.compute()),
                kid=float(kid_mean),
                kid_std=float(kid_std),
                step=opts.steps,
                sampler=SAMPLER,
                sampler_steps=STEPS,
                eval_seed=EVAL_SEED,
                num_samples=opts.num_samples,
                num_real=len(ref),
                reference=f"{reference.identity}: {('first', 'second')[name == 'B']} half of {len(feats)}",
                extractor=extractor.identity,
                training=training,
                t0=launched["t0"],
                train_commit=launched.get("commit") or opts.train_commit,
                eval_code=opts.code_commit,
            )
        done.add((training, seed, label))
        print(f"{run.name} EMA {label}: {time.time() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- report


def newest(records: list[dict]) -> dict[tuple, dict]:
    """(seed, ema, half) -> the newest record of the newest training session."""
    if not records:
        return {}
    training = max(records, key=lambda r: r["time"])["training"]
    return {(r["seed"], r["ema"], r["half"]): r for r in records if r["training"] == training}


def build_report(records: list[dict]) -> tuple[str, dict]:
    """The "posthoc_ema" block and the plot's curves, from raw records alone."""
    pts = newest([r for r in records if r.get("kind") == "point"])
    if not pts:
        return "Not measured yet under the protocol.", {}
    if len({r["extractor"] for r in pts.values()}) > 1:
        raise ValueError("the points were measured with different FID extractors")
    seeds = sorted({s for s, _, _ in pts})
    lengths = sorted({e for _, e, _ in pts if e != "training"}, key=float)
    first = next(iter(pts.values()))
    complete = [s for s in seeds if all((s, e, h) in pts for e in ["training", *lengths] for h in HALVES)]
    lines = [
        f"**Post-hoc EMA**, row {first['row']} (the default job with model/ema=posthoc, bf16-mixed) at step "
        f"{first['step']}, seeds {complete}, training session `{first['training']}` (training commit "
        f"{first.get('train_commit') or 'unknown'}, evaluated with {first.get('eval_code') or '?'}). "
        f"Classifier-FID / KID of {first['num_samples']} {first['sampler']} samples at "
        f"{first['sampler_steps']} steps (the same image seeds for every EMA), against two disjoint halves "
        f"A and B of Fashion-MNIST's test split ({first['num_real']} images each). The EMA length σ_rel is "
        "chosen on one half and scored on the other; the baseline is the run's training-time EMA "
        "(model.ema.sample_std). Median [interval] over seeds (min-max below 5 seeds).",
        "",
        machine_line(list(pts.values())),
        "",
    ]
    if not complete:
        return "\n".join([*lines, "No seed has every EMA length on both halves yet."]), {}
    best_on = {
        h: {s: min(lengths, key=lambda e, s=s, h=h: pts[s, e, h]["fid"]) for s in complete} for h in HALVES
    }
    header = ["σ_rel", "FID on A", "FID on B", "KID on B", "best on A (seeds)"]
    body = []
    for e in ["training", *lengths]:
        body.append(
            [
                f"training-time EMA ({pts[complete[0], e, 'A']['ema_std']})" if e == "training" else e,
                str(interval([pts[s, e, "A"]["fid"] for s in complete])),
                str(interval([pts[s, e, "B"]["fid"] for s in complete])),
                str(interval([pts[s, e, "B"]["kid"] for s in complete])),
                "-" if e == "training" else sum(best_on["A"][s] == e for s in complete),
            ]
        )
    lines += [table(header, body), ""]
    header = [
        "estimate",
        "per seed: σ_rel chosen",
        "post-hoc FID (other half)",
        "training-time EMA FID (same half)",
        "post-hoc - training-time",
        "post-hoc better (interval < 0)",
    ]
    body = []
    for choose, score in (("A", "B"), ("B", "A")):
        ph = [pts[s, best_on[choose][s], score]["fid"] for s in complete]
        tr = [pts[s, "training", score]["fid"] for s in complete]
        diff = interval([a - b for a, b in zip(ph, tr, strict=True)])
        body.append(
            [
                f"chosen on {choose}, scored on {score}",
                ", ".join(f"seed {s}: {best_on[choose][s]}" for s in complete),
                str(interval(ph)),
                str(interval(tr)),
                str(diff),
                claim(diff, 0.0, quality=True),
            ]
        )
    lines += [table(header, body), ""]
    gaps = [abs(pts[s, "training", "A"]["fid"] - pts[s, "training", "B"]["fid"]) for s in complete]
    lines.append(
        "Reference noise: the same images' FID against half A and against half B differs by "
        f"{statistics.median(gaps):.3f} (median over seeds, training-time EMA); a difference between EMA "
        "lengths smaller than this is within the reference's own noise."
    )
    curves = {
        s: {
            h: [(float(e), pts[s, e, h]["fid"]) for e in lengths] + [(-1.0, pts[s, "training", h]["fid"])]
            for h in HALVES
        }
        for s in complete
    }
    return "\n".join(lines).strip(), curves


def plot(curves: dict, path: Path, sample_std: float = 0.10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (seed, halves) in enumerate(curves.items()):
        for h, style in zip(HALVES, ("-", "--"), strict=True):
            pts = [p for p in halves[h] if p[0] >= 0]
            ax.plot(
                *zip(*pts, strict=True), style, marker="o", color=colors[i], label=f"seed {seed}, half {h}"
            )
            train = next(p[1] for p in halves[h] if p[0] < 0)
            ax.scatter([sample_std], [train], marker="x", s=60, color=colors[i], zorder=3)
    ax.set_xlabel("post-hoc EMA length σ_rel (x: the training-time EMA)")
    ax.set_ylabel(f"held-out classifier-FID ({SAMPLER}, {STEPS} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(opts: argparse.Namespace) -> None:
    records = load(BENCH, opts.raw)
    text, curves = build_report(records)
    write_section(BENCH, text)
    if curves:
        stds = {r["ema_std"] for r in records if r.get("ema") == "training"}
        plot(curves, Path(opts.plot), stds.pop() if len(stds) == 1 else 0.10)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/difflab_ttq_fashion_mnist", help="time_to_quality.py's --work")
    ap.add_argument("--row", default="posthoc_bf16", help="the post-hoc EMA row of time_to_quality.py")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000, help="the checkpoint: the end of the runs' budget")
    ap.add_argument("--stds", nargs="*", type=float, default=STDS, help="EMA lengths σ_rel reconstructed")
    ap.add_argument("--num-samples", type=int, default=1000, help="generated images per EMA length")
    ap.add_argument("--num-real", type=int, default=10000, help="held-out images, split into halves A and B")
    ap.add_argument(
        "--cache-dir", default=None, help="FID classifier and features (default <work>/eval/fid_cache)"
    )
    ap.add_argument("--code", default=None, help="a difflab source tree to import difflab from (its src/)")
    ap.add_argument(
        "--train-commit", default=None, help="the training code's commit, for runs trained elsewhere"
    )
    ap.add_argument("--raw", default=str(RAW), help="raw records dir (a smoke run writes elsewhere)")
    ap.add_argument("--plot", default=str(HERE / "fid_vs_ema.png"))
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's block and the plot from raw")
    opts = ap.parse_args()
    if opts.report:
        return report(opts)
    code = Path(opts.code).resolve() if opts.code else REPO
    if opts.code:
        sys.path.insert(0, str(code / "src"))
    head = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    opts.code_commit = f"{head} ({code})" if opts.code else head
    opts.cache_dir = opts.cache_dir or str(Path(opts.work) / "eval" / "fid_cache")
    rec = Recorder(BENCH, opts.raw)
    done = {
        (r["training"], r["seed"], r["ema"])
        for r in load(BENCH, opts.raw)
        if r.get("kind") == "point" and r["num_samples"] == opts.num_samples
    }
    for seed in opts.seeds:
        measure_seed(seed, opts, rec, done)
    print(f"raw: {rec.path}; tables: {Path(__file__).name} --report")


if __name__ == "__main__":
    main()
