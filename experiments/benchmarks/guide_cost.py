"""What training a guide alongside costs (issue 32, `model/guide=tiny`; goal: under 15% of a default step),
under the protocol (PROTOCOL.md): the default job (`small` UNet, Fashion-MNIST, batch 64, this machine's
default precision) with and without the guide; nothing else differs.

    .venv/bin/python experiments/benchmarks/guide_cost.py [--repeats 5]
    .venv/bin/python experiments/benchmarks/guide_cost.py --report       # RESULTS.md block "guide_cost"

Each alternation runs, interleaved, each row as a fresh `difflab-train` (precision_bench.train_once:
--steps optimizer steps timed after --warmup, wall time per step): the default job; with the guide while
it trains (`model.guide.duration=1.0`); with the guide frozen (`duration` ending at the first step: what
every step after the guide's duration costs); the default job again (the A/A noise floor). The guide's
cost over a whole run of the default duration d (0.25) is, per alternation,
d·(training − default) + (1 − d)·(frozen − default), ÷ the default step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from precision_bench import train_once  # noqa: E402
from protocol import (  # noqa: E402
    RAW,
    Recorder,
    claim,
    interleaved,
    interval,
    latest,
    load,
    machine_line,
    table,
    write_section,
)

BENCH = "guide_cost"
GOAL = 0.15  # issue 32: the guide's training cost under 15% of a default step
DURATION = 0.25  # conf/model/guide/tiny.yaml's default duration
ROWS: dict[str, list[str]] = {
    "default": [],
    "guide training": ["model/guide=tiny", "model.guide.duration=1.0"],
    "guide frozen": ["model/guide=tiny", "model.guide.duration=0.001"],
    "default again": [],
}


def measure(opts: argparse.Namespace) -> None:
    from difflab.precision import auto_precision

    rec = Recorder(BENCH, opts.raw_dir)
    precision = auto_precision("cpu")
    for k, row in interleaved(list(ROWS), opts.repeats):
        r = train_once(precision, opts.warmup, opts.steps, ROWS[row])
        r.update(precision=precision, overrides=ROWS[row], warmup=opts.warmup, steps=opts.steps)
        rec.record(row=row, repeat=k, **r)
        print(json.dumps({"repeat": k, "row": row, **r}), flush=True)


def build_report(records: list[dict]) -> str:
    """The markdown of the "guide_cost" block, from the newest invocation's whole alternations."""
    newest = latest(records, row="guide training")
    if not newest:
        return "Not measured yet under the protocol."
    records = [r for r in records if r["invocation"] == newest[0]["invocation"]]
    by = {row: {r["repeat"]: r["step_ms"] for r in records if r["row"] == row} for row in ROWS}
    whole = sorted(set.intersection(*(set(v) for v in by.values())))
    base = {k: by["default"][k] for k in whole}
    extra = {row: [by[row][k] / base[k] - 1 for k in whole] for row in ("guide training", "guide frozen")}
    run = [DURATION * t + (1 - DURATION) * f for t, f in zip(*extra.values(), strict=True)]
    floor = [by["default again"][k] / base[k] - 1 for k in whole]
    body = [
        ["while the guide trains", str(interval(extra["guide training"])), ""],
        ["after its duration (frozen)", str(interval(extra["guide frozen"])), ""],
        [f"a whole run, duration {DURATION}", str(interval(run)), claim(interval(run), GOAL)],
        ["noise floor: default again", str(interval(floor)), ""],
    ]
    sample = records[0]
    per = [[k, *(by[row][k] for row in ROWS)] for k in whole]
    return "\n".join(
        [
            "## Autoguidance: the cost of training a guide alongside",
            "",
            machine_line(records),
            "",
            "The default job (`difflab-train`, `small` UNet, Fashion-MNIST, batch 64, "
            f"{sample['precision']}) with and without `model/guide=tiny` (batch_fraction 0.25), a fresh "
            f"process each, {sample['steps']} optimizer steps timed after {sample['warmup']}, rows "
            f"interleaved in each of {len(whole)} alternations; the guide's extra wall time per step ÷ "
            "the default step's.",
            "",
            table(["extra time per step", "median [95% interval]", f"verdict: under {GOAL:g}"], body),
            "",
            "Per alternation (ms of wall time per optimizer step):",
            "",
            table(["alternation", *ROWS], per),
        ]
    )


def report(raw_dir: Path = RAW) -> None:
    body = build_report(load(BENCH, raw_dir))
    if Path(raw_dir).resolve() == RAW.resolve():  # a smoke run's records are printed only
        write_section(BENCH, body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's block from raw JSON lines")
    ap.add_argument("--repeats", type=int, default=5, help="alternations (>= 5 for a speed claim)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    opts = ap.parse_args()
    if opts.report:
        report(opts.raw_dir)
    else:
        measure(opts)


if __name__ == "__main__":
    main()
