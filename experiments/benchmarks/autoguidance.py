"""Autoguidance (issue 32): held-out FID of the default job unguided against guided by a weaker version of
itself, at equal sampling cost and at equal steps, under the protocol (PROTOCOL.md).

    .venv/bin/python experiments/benchmarks/autoguidance.py                 # train, evaluate, record
    .venv/bin/python experiments/benchmarks/autoguidance.py --report        # RESULTS.md block from raw
    .venv/bin/python experiments/benchmarks/autoguidance.py --steps 40 --seeds 0 --data fashion_mnist \
        --num-samples 64 --num-real 256 --work /tmp/ag_smoke                  # a smoke run

One invocation, seed-major, each (seed, data) trained once with the real `difflab-train`: the default
job (2,000 steps) with `model/ema=posthoc` (the same training, plus EMA snapshots every --steps/40 steps)
and `model/guide=tiny` (a guide trained alongside, which leaves the model's training bit for bit as it
is: tests/test_trained_guide.py), a checkpoint every --steps/4; sampled with its EMA (σ_rel 0.10).
Guides: (a) ``step:<steps/4>``, the model's own checkpoint at a quarter of its training; (b)
``ema:0.02``, a short post-hoc EMA of the model's run; (c) ``alongside``, the `tiny` UNet trained
alongside on a quarter of each batch for the first quarter of the run (its cost: guide_cost.py). Each at
--weights, DPM-Solver++ at --steps-guided sampler steps (two network evaluations a step), against the
model unguided at the same steps (equal steps) and at twice them (equal sampling cost). FID (classifier
features, difflab-eval) of --num-samples images against Fashion-MNIST's held-out test split (twemoji: its
training images, as time_to_quality.py), KID beside it. Noise floor: seed 0's unguided model sampled
again with image seeds 1 and 2.

Raw records: raw/autoguidance.jsonl; --report writes the "autoguidance" block of RESULTS.md from them alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from meanflow_quality import run_eval  # noqa: E402
from protocol import RAW, Recorder, claim, interval, load, machine_line, table, write_section  # noqa: E402
from time_to_quality import HELD_OUT, run_command  # noqa: E402

BENCH = "autoguidance"
SAMPLER = "dpmsolver++"
EVAL_SEED, NOISE_SEEDS = 1234, [1, 2]
GOAL = 0.75  # issue 32: at least 25% lower held-out FID than unguided at equal sampling cost


def model_run(opts: argparse.Namespace, data: str, seed: int) -> Path:
    return opts.work / data / f"model_seed{seed}"


def train(opts: argparse.Namespace, data: str, seed: int) -> dict:
    """The run of (data, seed), timed from its launch to its last checkpoint; read back when done."""
    run = model_run(opts, data, seed)
    done = opts.work / data / f"trained_seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    run_command(
        [
            str(BIN / "difflab-train"),
            f"data={data}",
            f"seed={seed}",
            "model/ema=posthoc",
            f"model.ema.snapshot_every={max(1, opts.steps // 40)}",
            "model/guide=tiny",
            f"trainer.max_steps={opts.steps}",
            f"callbacks.model_checkpoint.every_n_train_steps={opts.steps // 4}",
            "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.sample_grid=null",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        opts.work,
        opts.code,
    )
    last = max((run / "checkpoints").glob("step_*.ckpt"))
    timing = {"seconds": last.stat().st_mtime - t0, "steps": int(last.stem.split("_")[1])}
    print(f"trained {data} seed {seed}: {timing['seconds']:.0f} s", flush=True)
    done.write_text(json.dumps(timing))
    return timing


def evaluate(
    opts: argparse.Namespace, data: str, seed: int, name: str, args: list[str], eval_seed: int
) -> list:
    """One difflab-eval call of the model of (data, seed); its rows (read back when already done)."""
    out = opts.work / "eval" / data / f"seed{seed}_{name}_eval{eval_seed}"
    if (out / "done").is_file():
        return json.loads((out / "results.json").read_text())
    ckpt = model_run(opts, data, seed) / "checkpoints" / f"step_{opts.steps:07d}.ckpt"
    rows = run_eval(opts, data, ckpt, out, eval_seed, f"sampler={SAMPLER}", *args)
    (out / "done").touch()
    return rows


def run(opts: argparse.Namespace) -> None:
    rec = Recorder(BENCH, opts.raw)
    opts.work.mkdir(parents=True, exist_ok=True)
    guided = ",".join(map(str, opts.steps_guided))
    unguided = ",".join(map(str, sorted({*opts.steps_guided, *(2 * n for n in opts.steps_guided)})))
    for seed in opts.seeds:
        for data in opts.data:
            timing = train(opts, data, seed)
            guides = {
                f"step:{opts.steps // 4}": "early checkpoint",
                "ema:0.02": "short post-hoc EMA",
                "alongside": "tiny alongside",
            }
            rec.record(kind="run", data=data, seed=seed, steps=opts.steps, timing=timing)
            calls = [("unguided", [f"steps=[{unguided}]"], EVAL_SEED)]
            calls.append(
                (
                    "guided",
                    [
                        f"steps=[{guided}]",
                        "guide=[" + ",".join(guides) + "]",
                        "guidance=[" + ",".join(map(str, opts.weights)) + "]",
                    ],
                    EVAL_SEED,
                )
            )
            if seed == opts.seeds[0]:
                calls += [("unguided", [f"steps=[{guided}]"], s) for s in NOISE_SEEDS]
            for name, args, eval_seed in calls:
                for r in evaluate(opts, data, seed, name, args, eval_seed):
                    fid_key = next(k for k in r if k.startswith("val/fid_"))
                    kid_key = next(k for k in r if k.startswith("val/kid_") and not k.endswith("_std"))
                    guide = r.get("guide")
                    rec.record(
                        kind="point",
                        data=data,
                        seed=seed,
                        eval_seed=eval_seed,
                        guide=guides.get(guide, guide),
                        guidance=r.get("guidance", 1.0),
                        sampler_steps=r["steps"],
                        evaluations=r["steps"] * (2 if guide else 1),
                        fid=r[fid_key],
                        kid=r[kid_key],
                        extractor=r["extractor"],
                        num_samples=r["num_samples"],
                        num_real=r["num_real"],
                        real_split=HELD_OUT[data],
                    )
                    print(
                        f"{data} seed {seed} {guide} w={r.get('guidance', 1.0)} {r['steps']} steps: "
                        f"FID {r[fid_key]:.3f}",
                        flush=True,
                    )


# ----------------------------------------------------------------------------------------------- report


def cell(xs: list[float]) -> str:
    return str(interval(xs)) if xs else "-"


def build_report(records: list[dict]) -> str:
    pts: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "point":
            pts[(r["data"], r["seed"], r["eval_seed"], r["guide"], r["guidance"], r["sampler_steps"])] = r
    if not pts:
        return "Not measured yet."
    main = [p for p in pts.values() if p["eval_seed"] == EVAL_SEED]
    first = main[0]
    lines = [
        "**Autoguidance** (issue 32): the default job (trained with `model/ema=posthoc`, sampled with its "
        f"EMA) unguided and guided, {SAMPLER}. Classifier-FID of {first['num_samples']} samples (image seed "
        f"{EVAL_SEED}); each cell: median [min-max] over seeds. Guides: the model's checkpoint at a "
        "quarter of its training (early checkpoint), its post-hoc EMA at σ_rel 0.02 (short post-hoc EMA), "
        "the `tiny` UNet trained alongside (`model/guide=tiny`: a quarter of each batch, the first quarter "
        "of the run; tiny alongside). A guided step costs two network evaluations: equal cost compares "
        "guided n steps with unguided 2n. The guide's training cost: the guide_cost block.",
        "",
        machine_line(records),
    ]
    for data in dict.fromkeys(p["data"] for p in main):
        here = [p for p in main if p["data"] == data]
        seeds = sorted({p["seed"] for p in here})
        ref = (
            f"{here[0]['num_real']} held-out {here[0]['real_split']} images"
            if here[0]["real_split"]
            else f"{here[0]['num_real']} training images (no held-out split)"
        )
        lines += ["", f"### data={data}: seeds {seeds}, FID against {ref}", ""]
        unguided = {(p["seed"], p["sampler_steps"]): p["fid"] for p in here if p["guide"] is None}
        settings = list(dict.fromkeys((p["guide"], p["guidance"], p["sampler_steps"]) for p in here))
        body, medians = [], {}
        for guide, w, n in settings:
            mine = [p for p in here if (p["guide"], p["guidance"], p["sampler_steps"]) == (guide, w, n)]
            fids = [p["fid"] for p in mine]
            medians[(guide, w, n)] = statistics.median(fids)
            row = [guide or "unguided", w, n, mine[0]["evaluations"], cell(fids)]
            if guide is None:
                row += ["", "", ""]
            else:
                cost = [
                    p["fid"] / unguided[(p["seed"], 2 * n)] for p in mine if (p["seed"], 2 * n) in unguided
                ]
                same = [p["fid"] / unguided[(p["seed"], n)] for p in mine if (p["seed"], n) in unguided]
                iv = interval(cost) if cost else None
                row += [str(iv) if iv else "-", cell(same), claim(iv, GOAL, quality=True) if iv else "-"]
            body.append(row)
        lines += [
            table(
                [
                    "guide",
                    "w",
                    "sampler steps",
                    "network evaluations",
                    "FID",
                    "÷ unguided at equal cost",
                    "÷ unguided at equal steps",
                    f"goal ≤ {GOAL} at equal cost",
                ],
                body,
            ),
            "",
        ]
        best = min((k for k in medians if k[0] is not None), key=medians.get, default=None)
        if best:
            lines.append(
                f"Best guided setting (median FID): {best[0]}, w = {best[1]}, {best[2]} steps: "
                f"{medians[best]:.3g}."
            )
            per_guide = []
            for g in dict.fromkeys(k[0] for k in medians if k[0] is not None):
                k = min((k for k in medians if k[0] == g), key=medians.get)
                per_guide.append(f"{g} w = {k[1]} ({medians[k]:.3g})")
            lines.append("Best w per guide (median FID): " + "; ".join(per_guide) + ".")
        floor = {
            p["eval_seed"]: p["fid"]
            for p in pts.values()
            if p["data"] == data
            and p["seed"] == seeds[0]
            and p["guide"] is None
            and p["sampler_steps"] == settings[0][2]
        }
        if len(floor) > 1:
            spread = max(floor.values()) - min(floor.values())
            lines.append(
                f"Noise floor: seed {seeds[0]}'s model unguided at {settings[0][2]} steps, image seeds "
                f"{sorted(floor)}: "
                f"FID spread {spread:.3g} ({spread / statistics.median(floor.values()):.1%} of the median)."
            )
    return "\n".join(lines)


def report(opts: argparse.Namespace) -> None:
    body = build_report(load(BENCH, opts.raw))
    print(body)
    if opts.raw.resolve() == RAW.resolve():  # a smoke run's records are printed only
        write_section(BENCH, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["fashion_mnist", "twemoji"], choices=list(HELD_OUT))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000, help="the model's optimizer steps (the default job's)")
    p.add_argument("--steps-guided", nargs="+", type=int, default=[10])
    p.add_argument("--weights", nargs="+", type=float, default=[1.25, 1.5, 2.0])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--work", type=Path, default=Path("/tmp/autoguidance"))
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--code", default=None, help="train and evaluate with the difflab of this source tree")
    p.add_argument("--report", action="store_true")
    opts = p.parse_args()
    if not opts.report:
        opts.work = opts.work.resolve()
        run(opts)
    report(opts)


if __name__ == "__main__":
    main()
