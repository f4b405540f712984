"""What a MeanFlow training step costs against a flow step (issue 31's goal: at most 2x on a CPU), under
the protocol (PROTOCOL.md): the same default job (`small` UNet, Fashion-MNIST, batch 32), UNet, batch and
precision; only `model=meanflow` differs.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/meanflow_cost.py [--repeats 5]
    .venv/bin/python experiments/benchmarks/meanflow_cost.py --report       # RESULTS.md block "meanflow_cost"

Each alternation runs, interleaved, each row as a fresh `difflab-train` (precision_bench.train_once:
--steps optimizer steps timed after --warmup, CPU time per step): flow and MeanFlow at 32-true and at
bf16-mixed (MeanFlow's JVP pass runs without autocast: diffusion/meanflow.py), and the first row again
(the A/A noise floor). A ratio is MeanFlow's CPU time per step ÷ flow's, paired within an alternation.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ratio_pairs,
    table,
    write_section,
)

BENCH = "meanflow_cost"
GOAL = 2.0  # issue 31: a JVP training step at most 2x the cost of a flow step on CPU
ROWS: dict[str, tuple[str, list[str]]] = {  # row -> (trainer.precision, overrides)
    "flow fp32": ("32-true", []),
    "meanflow fp32": ("32-true", ["model=meanflow"]),
    "flow bf16": ("bf16-mixed", []),
    "meanflow bf16": ("bf16-mixed", ["model=meanflow"]),
    "flow fp32 again": ("32-true", []),
}
FIGURES = {  # figure -> (numerator row, denominator row): CPU time per step, numerator ÷ denominator
    "32-true: MeanFlow step ÷ flow step": ("meanflow fp32", "flow fp32"),
    "bf16-mixed: MeanFlow step ÷ flow step": ("meanflow bf16", "flow bf16"),
    "noise floor: flow fp32 again ÷ flow fp32": ("flow fp32 again", "flow fp32"),
}


def measure(opts: argparse.Namespace) -> None:
    rec = Recorder(BENCH, opts.raw_dir)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    for k, row in interleaved(list(ROWS), opts.repeats):
        precision, overrides = ROWS[row]
        r = train_once(precision, opts.warmup, opts.steps, overrides)
        r.update(precision=precision, overrides=overrides, warmup=opts.warmup, steps=opts.steps)
        rec.record(row=row, repeat=k, omp_num_threads=threads, **r)
        print(json.dumps({"repeat": k, "row": row, **r}), flush=True)


def build_report(records: list[dict]) -> str:
    """The markdown of the "meanflow_cost" block, from the newest invocation's whole alternations."""
    newest = latest(records, row="meanflow fp32")
    if not newest:
        return "Not measured yet under the protocol."
    records = [r for r in records if r["invocation"] == newest[0]["invocation"]]
    by = {row: [r for r in records if r["row"] == row] for row in ROWS}
    whole = set.intersection(*({r["repeat"] for r in by[row]} for row in ROWS))
    by = {
        row: sorted((r for r in by[row] if r["repeat"] in whole), key=lambda r: r["repeat"]) for row in ROWS
    }
    body = []
    for figure, (numer, denom) in FIGURES.items():
        # time per step = 1 / speed: numerator's time ÷ denominator's = denominator's speed ÷ numerator's
        iv = interval(ratio_pairs(by[denom], by[numer], "steps_per_cpu_sec"))
        goal = "" if figure.startswith("noise") else claim(iv, GOAL, lower_is_better=True)
        body.append([figure, str(iv), goal])
    per = [[k, *(by[row][i]["cpu_step_ms"] for row in ROWS)] for i, k in enumerate(sorted(whole))]
    sample = by["flow fp32"][0]
    threads = sorted({str(r.get("threads")) for r in records})
    return "\n".join(
        [
            "## MeanFlow: a training step's cost against a flow step",
            "",
            machine_line(records),
            "",
            "The default job (`difflab-train`, `small` UNet, Fashion-MNIST, batch 32) with and without "
            f"`model=meanflow`, a fresh process each, {sample['steps']} optimizer steps timed after "
            f"{sample['warmup']}, {', '.join(threads)} thread(s), rows interleaved in each of {len(whole)} "
            "alternations; by CPU time per step.",
            "",
            table(["figure", "median [95% interval]", f"verdict: at most {GOAL:g}x"], body),
            "",
            "Per alternation (ms of CPU time per optimizer step):",
            "",
            table(["alternation", *ROWS], per),
        ]
    )


def report(raw_dir: Path = RAW) -> None:
    body = build_report(load(BENCH, raw_dir))
    write_section(BENCH, body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's block from raw JSON lines")
    ap.add_argument("--repeats", type=int, default=5, help="alternations (>= 5 for a speed claim)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    opts = ap.parse_args()
    if opts.report:
        report()
    else:
        measure(opts)


if __name__ == "__main__":
    main()
