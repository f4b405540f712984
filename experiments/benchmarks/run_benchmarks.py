"""Benchmark difflab against a bare PyTorch loop and diffusers; writes experiments/benchmarks/RESULTS.md.

    .venv/bin/python experiments/benchmarks/run_benchmarks.py [--quick]

Each figure comes from a fresh process (bench_worker.py). difflab and its baseline run alternately, and
ratios are taken within each alternation pair: the machine is noisy, absolute times from different
moments are not comparable.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def worker(mode: str, **kw) -> dict:
    # Each run's scratch (run dir, checkpoints, caches: up to ~1 GB) goes when it ends; ~150 runs add up.
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        return _run_worker(mode, tmp, kw)


def _run_worker(mode: str, tmp: str, kw: dict) -> dict:
    args = [sys.executable, str(HERE / "bench_worker.py"), mode, "--tmp", tmp]
    for k, v in kw.items():
        if isinstance(v, list | tuple):
            for item in v:
                args += [f"--{k}", str(item)]
        elif v is True:
            args.append(f"--{k}")
        elif v not in (False, None):
            args += [f"--{k}", str(v)]
    p = subprocess.run(
        args, capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), **_env()}
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {kw} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def med_spread(xs: list[float]) -> str:
    if not xs:
        return "n/a"  # a column an older --rows-from log did not record
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer configs (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument(
        "--rows-from", help="reuse the training rows printed (JSON lines) by an earlier run's log"
    )
    ap.add_argument(
        "--remeasure",
        choices=("32-true", "bf16-mixed"),
        help="with --rows-from: measure this precision's training rows again and reuse the others",
    )
    ap.add_argument("--presets", nargs="+", help="only these UNet presets' training rows (a spot check)")
    ap.add_argument("--precisions", nargs="+", help="only these precisions' training rows")
    ap.add_argument(
        "--training-only", action="store_true", help="print the training rows; no levers, no RESULTS.md"
    )
    ap.add_argument("--lever", help="measure only the levers whose name contains this, print, stop")
    opts = ap.parse_args()
    if opts.lever:
        for r in measure_levers(opts.repeats, only=opts.lever):
            print(f"{r['lever']}: default ÷ changed {med_spread(r['ratio'])}")
        return
    repeats = 1 if opts.quick else opts.repeats
    t_start = time.time()

    matmul = worker("matmul")
    configs = [  # (preset, data, resolution, channels, batch, steps, warmup)
        ("tiny", "digits", 0, 1, 64, 150, 10),
        ("small", "fashion_mnist", 0, 1, 32, 40, 5),
        ("ddpm_cifar10", "fashion_mnist", 32, 3, 16, 4, 2),
    ]
    if opts.quick:
        configs = configs[:2]
    if opts.presets:
        configs = [c for c in configs if c[0] in opts.presets]
    rows = []
    precisions = tuple(opts.precisions or ("32-true", "bf16-mixed"))
    if opts.rows_from:
        with open(opts.rows_from) as f:
            rows = [json.loads(line) for line in f if line.startswith('{"preset"')]
        if opts.remeasure:
            rows = [r for r in rows if r["precision"] != opts.remeasure]
            precisions = (opts.remeasure,)
        else:
            configs = []
    for preset, data, res, ch, batch, steps, warmup in configs:
        flops = worker("flops", preset=preset, data=data, resolution=res or None, channels=ch)
        for precision in precisions:
            for synthetic in (True, False):
                if preset == "ddpm_cifar10" and not synthetic:
                    continue  # same network cost; the real-data path is covered by the smaller presets
                common = dict(
                    preset=preset,
                    data=data,
                    resolution=res or None,
                    channels=ch,
                    batch=batch,
                    steps=steps,
                    warmup=warmup,
                    synthetic=synthetic,
                )
                d, naive, same, matched = [], [], [], []
                for _ in range(repeats):  # alternate: difflab, naive, naive at its precision, matched
                    d.append(worker("difflab", precision=precision, **common))
                    naive.append(worker("bare", variant="naive", **common))
                    if precision != "32-true":
                        same.append(worker("bare", variant="naive", precision=precision, **common))
                    matched.append(worker("bare", variant="matched", precision=precision, **common))
                same = same or naive
                ips = [r["images_per_sec"] for r in d]
                r_naive = [a["images_per_sec"] / b["images_per_sec"] for a, b in zip(d, naive, strict=True)]
                r_same = [a["images_per_sec"] / b["images_per_sec"] for a, b in zip(d, same, strict=True)]
                r_match = [a["images_per_sec"] / b["images_per_sec"] for a, b in zip(d, matched, strict=True)]
                peak = matmul["matmul_bf16_gflops" if precision == "bf16-mixed" else "matmul_fp32_gflops"]
                per_image = flops["train_flops_per_image"] / 1e9
                achieved = [x * per_image for x in ips]
                achieved_matched = [x["images_per_sec"] * per_image for x in matched]
                mem = [a["max_rss_mb"] / b["max_rss_mb"] for a, b in zip(d, naive, strict=True)]
                rows.append(
                    {
                        "preset": preset,
                        "precision": precision,
                        "data": "synthetic" if synthetic else data,
                        "batch": batch,
                        "ips": ips,
                        "r_naive": r_naive,
                        "r_same": r_same,
                        "r_match": r_match,
                        "gflops": achieved,
                        "gflops_matched": achieved_matched,
                        "peak": peak,
                        "mem": mem,
                        "rss": [a["max_rss_mb"] for a in d],
                    }
                )
                print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)

    if opts.training_only:
        for r in rows:
            print(
                f"{r['preset']} {r['precision']} {r['data']}: {med_spread(r['ips'])} img/s, "
                f"÷ matched {med_spread(r['r_match'])}, ÷ naive {med_spread(r['r_naive'])}"
            )
        return
    order = [c[0] for c in configs] or [r["preset"] for r in rows]
    rows.sort(
        key=lambda r: (order.index(r["preset"]), r["precision"] != "32-true")
    )  # stable: data order kept
    levers = measure_levers(repeats)
    ckpt = make_demo_checkpoint()
    samp_d, samp_p = [], []
    for _ in range(repeats):
        samp_d.append(worker("sample", variant="difflab", ckpt=ckpt, batch=64, steps=20)["images_per_sec"])
        samp_p.append(worker("sample", variant="pipeline", ckpt=ckpt, batch=64, steps=20)["images_per_sec"])
    fid = worker("fid", ckpt=ckpt, data="fashion_mnist")
    shutil.rmtree(Path(ckpt).parents[1], ignore_errors=True)  # the demo run dir
    startup = [worker("startup")["startup_seconds"] for _ in range(repeats)]
    default_row = next(
        r for r in rows if r["preset"] == "small" and r["precision"] == "32-true" and r["data"] != "synthetic"
    )
    from omegaconf import OmegaConf

    every = OmegaConf.load(REPO / "conf" / "callbacks" / "with_fid.yaml").fid.every_n_steps
    train_s = every * 32 / statistics.median(default_row["ips"])  # default FID cadence, default batch
    fid_share = fid["fid_seconds"] / (fid["fid_seconds"] + train_s)
    write_results(
        opts.out,
        matmul,
        rows,
        samp_d,
        samp_p,
        fid,
        fid_share,
        train_s,
        startup,
        time.time() - t_start,
        opts,
        every,
        levers,
    )


# Each default speed lever, turned off one at a time on the default job's model and data:
# (what, overrides, repeated, precision of both runs).
LEVERS = [
    ("channels_last off (NCHW)", ["model.channels_last=false"], True, "32-true"),
    # auto picks NCHW under bf16 on CPU; this row checks that choice against forcing NHWC.
    ("channels_last forced on under bf16-mixed", ["model.channels_last=true"], True, "bf16-mixed"),
    (
        "foreach AdamW instead of fused",
        ["model.optimizer.fused=null", "model.optimizer.foreach=true"],
        True,
        "32-true",
    ),
    ("per-tensor AdamW", ["model.optimizer.fused=null", "model.optimizer.foreach=false"], True, "32-true"),
    ("2 loader workers instead of 0", ["data.num_workers=2"], True, "32-true"),  # they share the 2 cores
    ("torch.compile on (model.compile=true)", ["model.compile=true"], False, "32-true"),  # minutes: once
    # Two profiles, and a snapshot in the 30 timed steps (3x the default cadence of one per 100 steps).
    (
        "post-hoc EMA (model/ema=posthoc)",
        ["model/ema=posthoc", "model.ema.snapshot_every=30"],
        True,
        "32-true",
    ),
]


def measure_levers(repeats: int, only: str | None = None) -> list[dict]:
    """difflab default ÷ difflab with one lever changed, alternating; >1 means the default wins."""
    common = dict(preset="small", data="fashion_mnist", batch=32, steps=30, warmup=5)
    out = []
    for name, overrides, repeat, precision in LEVERS:
        if only and only not in name:
            continue
        ratios, firsts = [], []
        for _ in range(repeats if repeat else 1):
            d = worker("difflab", precision=precision, **common)
            v = worker("difflab", precision=precision, override=overrides, **common)
            ratios.append(d["images_per_sec"] / v["images_per_sec"])
            firsts.append(v["first_step_s"])
        out.append(
            {
                "lever": name,
                "overrides": overrides,
                "precision": precision,
                "ratio": ratios,
                "first_step_s": firsts,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def make_demo_checkpoint() -> str:
    """A short default-job checkpoint (the sampling/FID cost does not depend on how trained it is)."""
    run = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    subprocess.run(
        [
            str(Path(sys.executable).parent / "difflab-train"),
            "trainer.max_steps=5",
            "callbacks.sample_grid=null",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return str(run / "checkpoints" / "last.ckpt")


def write_results(
    out, matmul, rows, samp_d, samp_p, fid, fid_share, train_s, startup, total_s, opts, every, levers
):
    command = " ".join([".venv/bin/python experiments/benchmarks/run_benchmarks.py", *sys.argv[1:]])
    L = [
        "# difflab benchmarks",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Command: `{command}` ({total_s / 60:.1f} min). "
        "Medians with (min-max) over "
        f"{1 if opts.quick else opts.repeats} alternating repeats; each figure from a fresh process.",
        "",
        f"Matmul peak (2048², measured): fp32 {matmul['matmul_fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {matmul['matmul_bf16_gflops']:.0f} GFLOP/s.",
        "",
        *(
            [
                f"Training rows reused from an earlier full run's log (`--rows-from {opts.rows_from}`"
                + (
                    f" `--remeasure {opts.remeasure}`), except the {opts.remeasure} rows; those and "
                    if opts.remeasure
                    else "); "
                )
                + "the other figures were measured by this invocation.",
                "",
            ]
            if opts.rows_from
            else []
        ),
        "## Training",
        "",
        "`naive`: hand-written loop, fp32, NCHW, per-tensor AdamW/EMA/clipping, diffusers' own UNet class "
        "(what a user writes first). `naive, same precision`: that loop under difflab's precision (bf16 "
        "autocast in the bf16-mixed rows; in fp32 rows it is the naive loop). `matched`: the loop with "
        "difflab's precision, model class, memory format (channels_last) and kernels (fused AdamW in fp32, "
        "foreach under bf16-mixed, foreach clipping, one-pass foreach EMA), so its ratio is what the "
        "framework itself costs. difflab: a real `difflab-train` run (datamodule, Lightning, EMA, logging "
        "and callbacks at default cadence). % of peak: achieved training GFLOP/s ÷ the matmul rate of the "
        "precision used, for difflab and for the matched loop.",
        "",
        "| preset | precision | data | batch | difflab img/s | ÷ naive | ÷ naive, same precision "
        "| ÷ matched | GFLOP/s | % of matmul peak | matched loop % of peak | RSS MB | RSS ÷ naive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pct = [g / r["peak"] * 100 for g in r["gflops"]]
        pct_matched = [g / r["peak"] * 100 for g in r.get("gflops_matched", [])]
        L.append(
            f"| {r['preset']} | {r['precision']} | {r['data']} | {r['batch']} | {med_spread(r['ips'])} | "
            f"{med_spread(r['r_naive'])} | {med_spread(r.get('r_same', []))} | {med_spread(r['r_match'])} | "
            f"{med_spread(r['gflops'])} | {med_spread(pct)} | {med_spread(pct_matched)} | "
            f"{med_spread(r['rss'])} | {med_spread(r['mem'])} |"
        )
    L += [
        "",
        "## Speed levers (kept only where they win)",
        "",
        "`small` preset, Fashion-MNIST 28 px, batch 32: the default ÷ the same run with one lever "
        "changed, both at the row's precision (> 1: the default is faster). First step: seconds from train "
        "start to the first optimizer step of the changed run (compilation included).",
        "",
        "| changed | overrides | precision | default ÷ changed | changed run's first step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for lv in levers:
        L.append(
            f"| {lv['lever']} | `{' '.join(lv['overrides'])}` | {lv.get('precision', '32-true')} "
            f"| {med_spread(lv['ratio'])} | {med_spread(lv['first_step_s'])} |"
        )
    ratio = [a / b for a, b in zip(samp_d, samp_p, strict=True)]
    L += [
        "",
        "## Sampling, FID, start-up",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| sampling, `small` 28 px, DPM-Solver++ 20 steps, batch 64: difflab img/s | {med_spread(samp_d)} |",
        f"| same, diffusers `DDPMPipeline` img/s | {med_spread(samp_p)} |",
        f"| sampling ratio difflab ÷ pipeline | {med_spread(ratio)} |",
        f"| one FID evaluation (1,000 samples, DPM-Solver++ 20 steps, classifier features) | "
        f"{fid['fid_seconds']:.1f} s |",
        f"| training time between FID evaluations at the default cadence ({every:,} steps x 32) "
        f"| {train_s:.0f} s |",
        f"| FID share of training wall time | {fid_share * 100:.1f}% |",
        f"| start-up: process start → first optimizer step of `difflab-train` | {med_spread(startup)} s |",
    ]
    Path(out).write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
