"""Images in one or two steps (issue 31): held-out FID of MeanFlow at 1, 2 and 4 steps against today's
default at 1-20 DPM-Solver++ steps, at equal training wall time and at 2x, from scratch and from the
default's own run (`model.init_from`), under the protocol (PROTOCOL.md).

    .venv/bin/python experiments/benchmarks/meanflow_quality.py                 # train, evaluate, time
    .venv/bin/python experiments/benchmarks/meanflow_quality.py --report        # RESULTS.md + plot from raw
    .venv/bin/python experiments/benchmarks/meanflow_quality.py --steps 40 --seeds 0 --data fashion_mnist \
        --num-samples 64 --num-real 256 --speed-images 16 --work /tmp/mfq_smoke  # a smoke run

One invocation trains every (seed, data) seed-major, each seed's three rows back to back with the real
`difflab-train` (bf16 where the default picks it), so the machine's drift falls on all three alike:

- ``default``: today's default job for --steps optimizer steps; its wall time W (its last checkpoint's
  mtime minus the command's launch, start-up included) is the budget unit of this seed and data.
- ``meanflow``: `model=meanflow` from scratch, stopped once it has run 2W; evaluated at its last
  checkpoint within W (equal wall time) and within 2W.
- ``meanflow_init``: `model=meanflow model.init_from=<the default run's last checkpoint>`, stopped after
  W of tuning; evaluated at its last checkpoint within 0.5W and W of tuning, i.e. 1.5W and 2W counted
  together with the default's own run (what the issue's "at most 2x" budget allows).

MeanFlow runs checkpoint every --every steps; a point is the last checkpoint at or below its wall-time
budget. FID (classifier features, difflab-eval) of --num-samples images against Fashion-MNIST's held-out
test split (twemoji: its training images, as time_to_quality.py), KID beside it. Noise floor: seed 0's
default at 20 steps and meanflow_init at 1 and 2 steps, sampled again with image seeds 1 and 2.
Sampling speed: images/s of each (sampler, steps) on seed 0's checkpoints, in this process, interleaved
over --speed-repeats alternations, batch --speed-images, the same torch threads as the evaluations.

Raw records: raw/meanflow_quality.jsonl (kind run / point / speed). --report writes the
"meanflow_quality" block of RESULTS.md and meanflow_fid_vs_cost.png from them alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    RAW,
    Recorder,
    claim,
    code_env,
    interleaved,
    interval,
    load,
    machine_line,
    table,
    write_section,
)
from time_to_quality import HELD_OUT, checkpoints, run_command  # noqa: E402

BENCH = "meanflow_quality"
DEFAULT_SAMPLER, DEFAULT_COUNTS = "dpmsolver++", [1, 2, 4, 10, 20]
MEANFLOW_COUNTS = [1, 2, 4]
# row -> (overrides, wall-time limit in W, the points' budgets in W counted from the row's own launch)
ROWS: dict[str, tuple[list[str], float, list[float]]] = {
    "default": ([], 0.0, []),  # trained for --steps; its end is its one point
    "meanflow": (["model=meanflow"], 2.0, [1.0, 2.0]),
    "meanflow_init": (["model=meanflow", "model.init_from={init}"], 1.0, [0.5, 1.0]),
}
# What a point's budget is in the terms: the init row counts the default's own W as well.
SPENT_BEFORE = {"default": 0.0, "meanflow": 0.0, "meanflow_init": 1.0}
GOALS = {2: 1.2, 1: 1.5}  # issue 31: FID at 2 steps within 1.2x of the default at 20, 1 step within 1.5x
COMPARED = 20  # the default's sampler steps the goals divide by
EVAL_SEED, NOISE_SEEDS = 1234, [1, 2]
NUM_REAL = {"fashion_mnist": 10000, "twemoji": 3397}  # the whole reference set of each


def sampling_of(row: str) -> tuple[str, list[int]]:
    return (DEFAULT_SAMPLER, DEFAULT_COUNTS) if row == "default" else ("meanflow", MEANFLOW_COUNTS)


# ----------------------------------------------------------------------------------------------- training


def train(row: str, seed: int, data: str, opts: argparse.Namespace, wall: float | None) -> dict:
    """The row's `difflab-train`, stopped (kill -9: checkpoints are written atomically) once it has run
    its wall-time limit; returns {t0, checkpoint seconds}. A finished run is read back, not redone."""
    run = opts.work / data / f"{row}_seed{seed}"
    launched = run / "launched.json"
    if launched.is_file():
        return json.loads(launched.read_text())
    if run.exists():
        shutil.rmtree(run)  # a half-finished run: its timings would be wrong
    overrides, limit, _ = ROWS[row]
    init = opts.work / data / f"default_seed{seed}" / "checkpoints" / f"step_{opts.steps:07d}.ckpt"
    args = [
        f"data={data}",
        *(o.format(init=init) for o in overrides),
        f"seed={seed}",
        f"trainer.max_steps={opts.steps if row == 'default' else 100 * opts.steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={opts.steps if row == 'default' else opts.every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.sample_grid=null",
        "logger=none",
        f"hydra.run.dir={run}",
    ]
    cmd = [str(BIN / "difflab-train"), *args]
    opts.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if row == "default":
        run_command(cmd, opts.work, opts.code)
    else:
        log = (opts.work / f"{data}_{row}_seed{seed}.log").open("w")
        proc = subprocess.Popen(
            cmd, cwd=opts.work, stdout=log, stderr=subprocess.STDOUT, env=code_env(opts.code)
        )
        while proc.poll() is None and time.time() - t0 < limit * wall + 5:
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        elif proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log.name}")
    seconds = {str(s): c.stat().st_mtime - t0 for s, c in checkpoints(run).items()}
    out = {"t0": t0, "checkpoint_seconds": seconds, "overrides": args[:-1]}
    launched.write_text(json.dumps(out))
    print(
        f"trained {data} {row} seed {seed}: {time.time() - t0:.0f} s, {len(seconds)} checkpoints", flush=True
    )
    return out


def chosen(run: dict, budget: float) -> int | None:
    """The last checkpoint at or below ``budget`` seconds of the row's own wall time."""
    steps = [int(s) for s, sec in run["checkpoint_seconds"].items() if sec <= budget]
    return max(steps) if steps else None


# ----------------------------------------------------------------------------------------------- evaluation


def run_eval(opts: argparse.Namespace, data: str, ckpt: Path, out: Path, eval_seed: int, *args: str) -> list:
    """`difflab-eval` of ``ckpt`` (``args``: its sampler, steps, guides...) against this benchmark's
    reference of ``data`` (autoguidance.py's too); its rows."""
    run_command(
        [
            str(BIN / "difflab-eval"),
            f"ckpt={ckpt}",
            *args,
            f"num_samples={opts.num_samples}",
            f"num_real={min(opts.num_real, NUM_REAL[data])}",
            f"real_split={HELD_OUT[data] or 'null'}",
            "kid=true",
            f"seed={eval_seed}",
            f"metrics.cache_dir={opts.work / 'fid_cache'}",
            f"out={out}",
        ],
        opts.work,
        opts.code,
    )
    return json.loads((out / "results.json").read_text())


def evaluate(
    rec: Recorder,
    done: set,
    data: str,
    row: str,
    seed: int,
    step: int,
    extra: dict,
    opts: argparse.Namespace,
    counts: list[int] | None = None,
    eval_seed: int = EVAL_SEED,
) -> None:
    """difflab-eval of (row, seed)'s checkpoint at ``step``; one ``point`` record per sampler-step count."""
    sampler, all_counts = sampling_of(row)
    counts = [c for c in (counts or all_counts) if (data, row, seed, step, c, eval_seed) not in done]
    if not counts:
        return
    ckpt = opts.work / data / f"{row}_seed{seed}" / "checkpoints" / f"step_{step:07d}.ckpt"
    out = opts.work / "eval" / data / f"{row}_seed{seed}_step{step}_eval{eval_seed}"
    steps = "steps=[" + ",".join(map(str, counts)) + "]"
    for r in run_eval(opts, data, ckpt, out, eval_seed, f"sampler={sampler}", steps):
        fid_key = next(k for k in r if k.startswith("val/fid_"))
        kid_key = next(k for k in r if k.startswith("val/kid_") and not k.endswith("_std"))
        rec.record(
            kind="point",
            data=data,
            row=row,
            seed=seed,
            step=step,
            sampler=sampler,
            sampler_steps=r["steps"],
            eval_seed=eval_seed,
            fid=r[fid_key],
            kid=r[kid_key],
            fid_key=fid_key,
            extractor=r["extractor"],
            num_samples=opts.num_samples,
            num_real=r["num_real"],
            real_split=HELD_OUT[data],
            **extra,
        )
        done.add((data, row, seed, step, r["steps"], eval_seed))
        print(f"{data} {row} seed {seed} step {step}: FID {r['steps']} steps {r[fid_key]:.3f}", flush=True)


def measure_speed(rec: Recorder, data: str, opts: argparse.Namespace, ckpts: dict[str, Path]) -> None:
    """Images/s of every (row, sampler steps), interleaved over --speed-repeats alternations."""
    sys.path[:0] = [str(Path(opts.code or HERE.parents[1]) / "src")]
    import torch

    from difflab.diffusion.sampling import build_sampler, sample_batch
    from difflab.inference import load_trained_unet

    models = {row: load_trained_unet(str(c), use_ema=True, channels_last=False) for row, c in ckpts.items()}
    cases = [f"{row}:{n}" for row in ckpts for n in sampling_of(row)[1]]
    for k, case in interleaved(cases, opts.speed_repeats):
        row, n = case.split(":")
        unet, sched_cfg, _ = models[row]
        sampler = build_sampler(sampling_of(row)[0], sched_cfg)
        sample_batch(unet, sampler, range(2), 0, int(n))  # warm-up
        t = time.perf_counter()
        sample_batch(unet, sampler, range(opts.speed_images), 0, int(n))
        seconds = time.perf_counter() - t
        rec.record(
            kind="speed",
            data=data,
            row=row,
            sampler_steps=int(n),
            repeat=k,
            images=opts.speed_images,
            seconds=seconds,
            images_per_s=opts.speed_images / seconds,
            threads=torch.get_num_threads(),
        )
        print(f"{data} {row} {n} steps: {opts.speed_images / seconds:.1f} images/s", flush=True)


def run(opts: argparse.Namespace) -> None:
    rec = Recorder(BENCH, opts.raw)
    done = {
        (r["data"], r["row"], r["seed"], r["step"], r["sampler_steps"], r["eval_seed"])
        for r in load(BENCH, opts.raw)
        if r.get("kind") == "point" and r.get("num_samples") == opts.num_samples
    }
    for seed in opts.seeds:
        for data in opts.data:
            runs = {}
            for row in ROWS:
                wall = None if row == "default" else runs["default"]["checkpoint_seconds"][str(opts.steps)]
                runs[row] = train(row, seed, data, opts, wall)
            wall = runs["default"]["checkpoint_seconds"][str(opts.steps)]
            rec.record(kind="run", data=data, seed=seed, steps=opts.steps, wall=wall, runs=runs)
            for row, (_, _, budgets) in ROWS.items():
                if row == "default":
                    evaluate(rec, done, data, row, seed, opts.steps, {"budget": 1.0, "wall": wall}, opts)
                    continue
                for budget in budgets:
                    step = chosen(runs[row], budget * wall)
                    if step is None:
                        print(f"{data} {row} seed {seed}: no checkpoint within {budget} W", flush=True)
                        continue
                    extra = {
                        "budget": SPENT_BEFORE[row] + budget,
                        "wall": wall,
                        "seconds": runs[row]["checkpoint_seconds"][str(step)],
                    }
                    evaluate(rec, done, data, row, seed, step, extra, opts)
            if seed == opts.seeds[0]:  # the noise floor, and sampling speed on this seed's checkpoints
                last = chosen(runs["meanflow_init"], wall)
                for s in NOISE_SEEDS:
                    evaluate(
                        rec,
                        done,
                        data,
                        "default",
                        seed,
                        opts.steps,
                        {"budget": 1.0, "wall": wall},
                        opts,
                        [COMPARED],
                        s,
                    )
                    if last is not None:
                        extra = {
                            "budget": 2.0,
                            "wall": wall,
                            "seconds": runs["meanflow_init"]["checkpoint_seconds"][str(last)],
                        }
                        evaluate(rec, done, data, "meanflow_init", seed, last, extra, opts, [1, 2], s)
                ckpts = {
                    "default": opts.work
                    / data
                    / f"default_seed{seed}"
                    / "checkpoints"
                    / f"step_{opts.steps:07d}.ckpt"
                }
                if last is not None:
                    ckpts["meanflow_init"] = (
                        opts.work
                        / data
                        / f"meanflow_init_seed{seed}"
                        / "checkpoints"
                        / f"step_{last:07d}.ckpt"
                    )
                measure_speed(rec, data, opts, ckpts)


# ----------------------------------------------------------------------------------------------- report


def cell(xs: list[float]) -> str:
    return str(interval(xs)) if xs else "-"


def label(row: str, budget: float) -> str:
    return f"{row} ({budget:g} W)"


def build_report(records: list[dict]) -> tuple[str, dict]:
    """The markdown of the "meanflow_quality" block and the plot's curves, from raw records alone."""
    pts: dict[tuple, dict] = {}  # the newest record of each point
    for r in records:
        if r.get("kind") == "point":
            pts[(r["data"], r["row"], r["seed"], r["step"], r["sampler_steps"], r["eval_seed"])] = r
    if not pts:
        return "Not measured yet.", {}
    main = [p for p in pts.values() if p["eval_seed"] == EVAL_SEED]
    first = main[0]
    lines = [
        "**MeanFlow: images in 1-4 steps** (issue 31). "
        f"Classifier-FID / KID of {first['num_samples']} samples (image seed {EVAL_SEED}); "
        "each cell: median [min-max] over seeds. W = the default's training wall time (the same seed and "
        "data, trained back to back with the MeanFlow rows in one invocation, start-up included). "
        "`meanflow`: from scratch; `meanflow_init`: `model.init_from` the default's last checkpoint, its "
        "budget counting the default's own W. A MeanFlow point is its last checkpoint within the budget.",
        "",
        machine_line(records),
    ]
    curves: dict = {}
    for data in dict.fromkeys(p["data"] for p in main):
        here = [p for p in main if p["data"] == data]
        seeds = sorted({p["seed"] for p in here})
        runs = [r for r in records if r.get("kind") == "run" and r["data"] == data]
        steps = runs[-1]["steps"] if runs else "?"
        ref = (
            f"{here[0]['num_real']} held-out {here[0]['real_split']} images"
            if here[0]["real_split"]
            else (f"{here[0]['num_real']} training images (no held-out split)")
        )
        lines += ["", f"### data={data}: seeds {seeds}, default {steps} steps, FID against {ref}", ""]
        groups = list(dict.fromkeys((p["row"], p["budget"]) for p in here))
        groups.sort(key=lambda g: (list(ROWS).index(g[0]), g[1]))
        header = ["row (budget)", "optimizer steps", "wall ÷ W", *(f"FID {n} steps" for n in DEFAULT_COUNTS)]
        body = []
        for row, budget in groups:
            mine = [p for p in here if (p["row"], p["budget"]) == (row, budget)]
            by_step = {n: [p["fid"] for p in mine if p["sampler_steps"] == n] for n in DEFAULT_COUNTS}
            per_seed = {p["seed"]: p for p in mine}
            used = [(p.get("seconds") or p["wall"]) / p["wall"] for p in per_seed.values()]
            body.append(
                [label(row, budget), cell([p["step"] for p in per_seed.values()]), cell(used)]
                + [cell(by_step[n]) for n in DEFAULT_COUNTS]
            )
            curves[(data, label(row, budget))] = {n: statistics.median(v) for n, v in by_step.items() if v}
        lines += [table(header, body), ""]
        # The goals: per seed, the MeanFlow point's FID ÷ the same seed's default at COMPARED steps.
        target = {
            p["seed"]: p["fid"] for p in here if p["row"] == "default" and p["sampler_steps"] == COMPARED
        }
        goal_rows = []
        for row, budget in groups:
            if row == "default":
                continue
            for n, goal in GOALS.items():
                ratios = [
                    p["fid"] / target[p["seed"]]
                    for p in here
                    if (p["row"], p["budget"], p["sampler_steps"]) == (row, budget, n) and p["seed"] in target
                ]
                if ratios:
                    iv = interval(ratios)
                    shown = claim(iv, goal, quality=True) if budget <= 2 else "over budget"
                    goal_rows.append([label(row, budget), n, str(iv), f"≤ {goal}", shown])
        lines += [
            f"FID ÷ the same seed's default at {COMPARED} {DEFAULT_SAMPLER} steps (the issue's goals: "
            "2 steps within 1.2x, 1 step within 1.5x, at most 2 W of training):",
            "",
            table(["row (budget)", "MeanFlow steps", "FID ratio", "goal", "verdict"], goal_rows),
            "",
        ]
        noise = [p for p in pts.values() if p["data"] == data and p["seed"] == seeds[0]]
        floors = []
        for row, n in (("default", COMPARED), ("meanflow_init", 1), ("meanflow_init", 2)):
            fids = {
                p["eval_seed"]: p["fid"]
                for p in noise
                if (p["row"], p["sampler_steps"]) == (row, n) and (row == "default" or p["budget"] == 2.0)
            }
            if len(fids) > 1:
                spread = max(fids.values()) - min(fids.values())
                floors.append(
                    f"{row} at {n} steps, image seeds {sorted(fids)}: FID spread {spread:.3g} "
                    f"({spread / statistics.median(fids.values()):.1%} of the median)"
                )
        if floors:
            lines += [
                f"Noise floor (seed {seeds[0]}'s checkpoints sampled again): " + "; ".join(floors) + ".",
                "",
            ]
        speed = [r for r in records if r.get("kind") == "speed" and r["data"] == data]
        if speed:
            cases = list(dict.fromkeys((r["row"], r["sampler_steps"]) for r in speed))
            lines += [
                f"Sampling speed, batch {speed[0]['images']}, {speed[0]['threads']} thread(s), "
                f"{len({r['repeat'] for r in speed})} interleaved alternations:",
                "",
                table(
                    ["row", "sampler", "network evaluations per image", "images/s"],
                    [
                        [
                            row,
                            sampling_of(row)[0],
                            n,
                            cell(
                                [
                                    r["images_per_s"]
                                    for r in speed
                                    if (r["row"], r["sampler_steps"]) == (row, n)
                                ]
                            ),
                        ]
                        for row, n in cases
                    ],
                ),
                "",
            ]
    lines.append("Plot: `meanflow_fid_vs_cost.png` (FID against network evaluations per image).")
    return "\n".join(lines), curves


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(d for d, _ in curves))
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datas, strict=True):
        for (d, name), points in curves.items():
            if d == data and points:
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="network evaluations per image",
            ylabel="FID (median)",
            title=data,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(opts: argparse.Namespace) -> None:
    body, curves = build_report(load(BENCH, opts.raw))
    print(body)
    if opts.raw.resolve() != RAW.resolve():
        return  # a smoke run's records: printed, never into RESULTS.md
    write_section(BENCH, body)
    if curves:
        plot(curves, HERE / "meanflow_fid_vs_cost.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["fashion_mnist", "twemoji"], choices=list(HELD_OUT))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500, help="the default row's optimizer steps")
    p.add_argument("--every", type=int, default=25, help="MeanFlow rows: a checkpoint every N steps")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--speed-images", type=int, default=250)
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("/tmp/meanflow_quality"))
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--code", default=None, help="train and evaluate with the difflab of this source tree")
    p.add_argument("--report", action="store_true")
    opts = p.parse_args()
    if opts.report:
        report(opts)
        return
    opts.work = opts.work.resolve()
    run(opts)
    report(opts)


if __name__ == "__main__":
    main()
