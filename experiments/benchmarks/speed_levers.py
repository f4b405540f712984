"""The default job's speed levers, each against its alternative, under the protocol (PROTOCOL.md): the choices
difflab makes for the user (memory format by precision, the CPU bf16 attention kernel, NHWC sampling) are
defaults only while they measure faster on the CPU at hand.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/speed_levers.py [--repeats 5]
    .venv/bin/python experiments/benchmarks/speed_levers.py --report       # RESULTS.md block "speed_levers"

Each alternation runs, interleaved, each `difflab-train` in a fresh process (precision_bench.train_once:
the default job, --steps optimizer steps timed after --warmup, CPU time per step):

- ``bf16 auto``: bf16-mixed, `model.channels_last=auto` (NCHW on CPU under bf16);
- ``bf16 NHWC``: the same with `model.channels_last=true`;
- ``fp32 auto``: 32-true, `auto` (NHWC);
- ``fp32 NCHW``: the same with `model.channels_last=false`;
- ``bf16 auto again``: the first row repeated (the A/A noise floor of a training row);
- ``kernels``: bench_worker's ``kernels`` mode, one process: the `small` UNet's bf16 forward+backward
  at batch 32 through difflab's UNet class (attention on PyTorch's math kernel) and through diffusers'
  forward (PyTorch's own kernel choice), and its fp32 sampling forward at batch 64 in NHWC and NCHW,
  each with a repeated row (its A/A), calls alternated within the process.

A ratio above 1 means difflab's default is faster. Speed claims need 5 alternations; run at 1 thread on
a machine shared with other work (the CPU-time figures are the ones the others disturb least).
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
    run_worker,
    table,
    write_section,
)

BENCH = "speed_levers"
# row -> (trainer.precision, overrides); None: the kernels worker
ROWS: dict[str, tuple[str, list[str]] | None] = {
    "bf16 auto": ("bf16-mixed", []),
    "bf16 NHWC": ("bf16-mixed", ["model.channels_last=true"]),
    "fp32 auto": ("32-true", []),
    "fp32 NCHW": ("32-true", ["model.channels_last=false"]),
    "bf16 auto again": ("bf16-mixed", []),
    "kernels": None,
}
# figure -> (row of difflab's default, row of the alternative, key, the A/A's rows); speed = 1 / time, so
# a ratio of speeds is default ÷ alternative and > 1 means the default wins.
TRAINING = {
    "memory format under bf16-mixed: auto (NCHW) ÷ NHWC": ("bf16 auto", "bf16 NHWC"),
    "memory format under 32-true: auto (NHWC) ÷ NCHW": ("fp32 auto", "fp32 NCHW"),
    "noise floor: bf16 auto again ÷ bf16 auto": ("bf16 auto again", "bf16 auto"),
}
KERNELS = {  # figure -> (default's ms key, alternative's ms key): alternative ms ÷ default ms
    "bf16 training forward+backward: math attention kernel ÷ PyTorch's choice": (
        "attention_math_cpu_ms",
        "attention_default_cpu_ms",
    ),
    "noise floor: math kernel again ÷ math kernel": ("attention_math_again_cpu_ms", "attention_math_cpu_ms"),
    "fp32 sampling forward: NHWC ÷ NCHW": ("sample_nhwc_cpu_ms", "sample_nchw_cpu_ms"),
    "noise floor: NHWC again ÷ NHWC": ("sample_nhwc_again_cpu_ms", "sample_nhwc_cpu_ms"),
}


def measure(opts: argparse.Namespace) -> None:
    rec = Recorder(BENCH, opts.raw_dir)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    for k, row in interleaved(list(ROWS), opts.repeats):
        spec = ROWS[row]
        if spec is None:
            r = run_worker("kernels", steps=opts.kernel_calls, warmup=2)
        else:
            precision, overrides = spec
            r = train_once(precision, opts.warmup, opts.steps, overrides)
            r.update(precision=precision, overrides=overrides, warmup=opts.warmup, steps=opts.steps)
        rec.record(row=row, repeat=k, omp_num_threads=threads, **r)
        print(json.dumps({"repeat": k, "row": row, **r}), flush=True)


def build_report(records: list[dict]) -> str:
    """The markdown of the "speed_levers" block, from the newest invocation's whole alternations."""
    newest = latest(records, row="kernels")
    if not newest:
        return "Not measured yet under the protocol."
    records = [r for r in records if r["invocation"] == newest[0]["invocation"]]
    by = {row: [r for r in records if r["row"] == row] for row in ROWS}
    whole = set.intersection(*({r["repeat"] for r in by[row]} for row in ROWS))
    by = {
        row: sorted((r for r in rs if r["repeat"] in whole), key=lambda r: r["repeat"])
        for row, rs in by.items()
    }

    def speed_verdict(iv: object, floor: bool) -> str:
        return "" if floor else claim(iv, 1.0, lower_is_better=False)

    body = []
    for figure, (numer, denom) in TRAINING.items():
        iv = interval(ratio_pairs(by[numer], by[denom], "steps_per_cpu_sec"))
        body.append([figure, str(iv), speed_verdict(iv, figure.startswith("noise"))])
    kern = by["kernels"]
    for figure, (default, other) in KERNELS.items():
        iv = interval([r[other] / r[default] for r in kern])
        body.append([figure, str(iv), speed_verdict(iv, figure.startswith("noise"))])
    per = []
    for k in sorted(whole):
        get = {row: next(r for r in by[row] if r["repeat"] == k) for row in ROWS}
        per.append(
            [
                k,
                *(1000 / get[row]["steps_per_cpu_sec"] for row in ROWS if ROWS[row] is not None),
                get["kernels"]["attention_math_cpu_ms"],
                get["kernels"]["attention_default_cpu_ms"],
                get["kernels"]["sample_nhwc_cpu_ms"],
                get["kernels"]["sample_nchw_cpu_ms"],
            ]
        )
    sample = by["bf16 auto"][0]
    threads = sorted({str(r.get("threads")) for r in records})
    return "\n".join(
        [
            "## Speed levers: each default choice against its alternative",
            "",
            machine_line(records),
            "",
            "Training rows: the default job (`difflab-train`, flow, `small` UNet, Fashion-MNIST, batch "
            f"32), a fresh process each, {sample['steps']} optimizer steps timed after {sample['warmup']}, "
            f"{', '.join(threads)} thread(s); kernel rows: the `small` UNet alone in one process, "
            f"{kern[0]['threads']} thread(s), calls alternated. Rows interleaved in each of {len(whole)} "
            "alternations; every figure by CPU time. A ratio above 1: difflab's default is faster.",
            "",
            table(["figure", "median [95% interval]", "verdict: the default is faster"], body),
            "",
            "Per alternation (ms of CPU time per optimizer step or per call):",
            "",
            table(
                [
                    "alternation",
                    *(row for row in ROWS if ROWS[row] is not None),
                    "bf16 fwd+bwd, math kernel",
                    "bf16 fwd+bwd, PyTorch's choice",
                    "fp32 sampling fwd, NHWC",
                    "fp32 sampling fwd, NCHW",
                ],
                per,
            ),
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
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--kernel-calls", type=int, default=10, help="timed calls per kernel row")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    opts = ap.parse_args()
    if opts.report:
        report()
    else:
        measure(opts)


if __name__ == "__main__":
    main()
