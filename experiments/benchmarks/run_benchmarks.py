"""Framework cost: a real `difflab-train` run against hand-written PyTorch loops of the same job (issue 29).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/run_benchmarks.py --presets small tiny
    .venv/bin/python experiments/benchmarks/run_benchmarks.py --report       # RESULTS.md "framework_cost"
    .venv/bin/python experiments/benchmarks/run_benchmarks.py --lever post-hoc  # a spot check, printed

Today's default job: flow matching, the hardware's automatic precision (`trainer.precision`'s default,
difflab.precision), the UNet class's CPU attention-kernel choice. Rows, each a fresh process
(bench_worker.py), interleaved in every alternation (protocol.py):

- ``difflab``: `difflab-train`'s own code path (datamodule, Lightning, EMA, logging and callbacks at
  the default cadence) at the automatic precision;
- ``matched``: a hand-written loop given everything difflab's config gives the model (precision, UNet
  class, memory format, fused/foreach AdamW, foreach clipping, one-pass EMA): difflab ÷ matched is what
  the framework itself costs;
- ``naive``: the loop a user writes first (fp32, NCHW, per-tensor AdamW, EMA and clipping, diffusers'
  own UNet class);
- ``difflab again``: the first row repeated, the A/A noise floor.

Speed is images/s over each preset's timed steps after its warm-up, by the wall clock and by the
process's CPU time. The thread count is the environment's (recorded): on a shared machine run it at
OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    RAW,
    Recorder,
    interleaved,
    interval,
    latest,
    load,
    machine_line,
    ratio_pairs,
    run_worker,
    table,
    write_section,
)

BENCH = "framework_cost"
# preset: (data, resolution (0: the data's), channels, batch, timed steps, warm-up steps). Every preset is
# timed over >= 30 steps, so one slow step (a checkpoint, a logging step, the machine) cannot decide a ratio.
PRESETS = {
    "tiny": ("digits", 0, 1, 64, 100, 10),
    "small": ("fashion_mnist", 0, 1, 32, 40, 5),
    "ddpm_cifar10": ("fashion_mnist", 32, 3, 16, 30, 3),
}
# row: (bench_worker mode, variant, precision)
ROWS = {
    "difflab": ("difflab", None, "auto"),
    "matched": ("bare", "matched", "auto"),
    "naive": ("bare", "naive", "32-true"),
    "difflab again": ("difflab", None, "auto"),
}


def measure(presets: list[str], repeats: int, raw_dir: Path) -> None:
    rec = Recorder(BENCH, raw_dir)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    for preset in presets:
        data, res, ch, batch, steps, warmup = PRESETS[preset]
        common = dict(
            preset=preset,
            data=data,
            resolution=res or None,
            channels=ch,
            batch=batch,
            steps=steps,
            warmup=warmup,
        )
        for k, row in interleaved(list(ROWS), repeats):
            mode, variant, precision = ROWS[row]
            r = run_worker(mode, variant=variant, precision=precision, **common)
            rec.record(
                row=row,
                repeat=k,
                preset=preset,
                data=data,
                batch=batch,
                steps=steps,
                warmup=warmup,
                omp_num_threads=threads,
                **r,
            )
            print(json.dumps({"preset": preset, "repeat": k, "row": row, **r}), flush=True)


def report() -> None:
    records = load(BENCH)
    parts = ["## Framework cost: difflab vs hand-written loops of the default job", ""]
    summary, details, shown = [], [], []
    for preset in PRESETS:
        recs = latest(records, preset=preset)
        # Only whole alternations: a run killed mid-alternation leaves rows without their pair.
        whole = set.intersection(*({r["repeat"] for r in recs if r["row"] == row} for row in ROWS))
        recs = [r for r in recs if r["repeat"] in whole]
        if not recs:
            continue
        shown += recs
        by = {row: [r for r in recs if r["row"] == row] for row in ROWS}
        get = {row: {r["repeat"]: r for r in by[row]} for row in ROWS}

        def iv(key: str, numer: str, denom: str, by: dict = by) -> str:
            return str(interval(ratio_pairs(by[numer], by[denom], key)))

        first = by["difflab"][0]
        for key, clock in (("images_per_cpu_sec", "CPU time"), ("images_per_sec", "wall clock")):
            summary.append(
                [
                    preset,
                    f"{first['data']}, batch {first['batch']}, {first['steps']} steps after "
                    f"{first['warmup']}",
                    first["precision"],
                    clock,
                    str(interval([r[key] for r in by["difflab"]])),
                    iv(key, "difflab", "matched"),
                    iv(key, "difflab", "naive"),
                    iv(key, "difflab again", "difflab"),
                ]
            )
        for k in sorted(whole):
            d, m, n, a = (get[row][k] for row in ROWS)
            details.append(
                [
                    preset,
                    k,
                    *(get[row][k]["images_per_sec"] for row in ROWS),
                    d["images_per_cpu_sec"] / m["images_per_cpu_sec"],
                    d["images_per_cpu_sec"] / n["images_per_cpu_sec"],
                    a["images_per_cpu_sec"] / d["images_per_cpu_sec"],
                ]
            )
    if not shown:
        sys.exit(f"no raw/{BENCH}.jsonl records: run the benchmark first")
    threads = sorted({str(r.get("threads")) for r in shown})
    parts += [
        machine_line(shown),
        "",
        "Default objective (flow), automatic precision, a fresh process per figure, rows interleaved in each "
        f"alternation, {', '.join(threads)} thread(s). `matched`: a hand-written loop given difflab's "
        "precision, UNet class, memory format and kernels (difflab ÷ matched is the framework's own cost); "
        "`naive`: the loop a user writes first (fp32, NCHW, per-tensor AdamW/EMA/clipping, diffusers' UNet "
        "class); `difflab again` ÷ `difflab`: the A/A noise floor. Images/s by the process's CPU time (on a "
        "shared machine the figure other work disturbs least; at 1 thread, an idle machine's wall-clock "
        "speed) and by the wall clock; median [95% interval].",
        "",
        table(
            [
                "preset",
                "job",
                "precision",
                "clock",
                "difflab img/s",
                "difflab ÷ matched",
                "difflab ÷ naive",
                "noise floor (A/A)",
            ],
            summary,
        ),
        "",
        "Per alternation (img/s by the wall clock; ratios by CPU time):",
        "",
        table(
            [
                "preset",
                "alternation",
                *[f"{row} img/s" for row in ROWS],
                "÷ matched",
                "÷ naive",
                "A/A",
            ],
            details,
        ),
    ]
    body = "\n".join(parts)
    write_section(BENCH, body)
    print(body)


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
            d = run_worker("difflab", precision=precision, **common)
            v = run_worker("difflab", precision=precision, override=overrides, **common)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's section from raw JSON lines")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=5, help="alternations (>= 5 for a speed claim)")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    ap.add_argument("--lever", help="measure only the levers whose name contains this, print, stop")
    opts = ap.parse_args()
    if opts.report:
        report()
    elif opts.lever:
        for r in measure_levers(opts.repeats, only=opts.lever):
            ratio = interval(r["ratio"])
            print(f"{r['lever']}: default ÷ changed {ratio} (printed only; not a RESULTS.md figure)")
    else:
        measure(opts.presets, opts.repeats, opts.raw_dir)


if __name__ == "__main__":
    main()
