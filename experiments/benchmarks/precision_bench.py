"""bf16-mixed against 32-true on the default job, on the CPU at hand (issue 29: which precision each CPU
class runs fastest; `difflab.precision.auto_precision` follows the result).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/precision_bench.py [--repeats 5] [--steps 150]
    .venv/bin/python experiments/benchmarks/precision_bench.py --report      # RESULTS.md section "precision"

Each alternation runs, each in a fresh process: the default job (`difflab-train`: flow, `small` UNet,
Fashion-MNIST, batch 32, its callbacks and progress bar; no sample grid, no logger) in bf16-mixed, in
32-true, in 32-true again (the A-vs-A noise floor: what two identical runs differ by at that moment),
and a 2048x2048 matmul in bf16 and fp32 (bench_worker's ``matmul``). A run's speed is its steady-state
steps/s over ``--steps`` optimizer steps after ``--warmup`` (the last step, which writes the
checkpoint, is not timed), by the wall clock and by the process's CPU time. Ratios are taken within
each alternation (protocol.py); the end-FID comparison of the two precisions is time_to_quality's.

The thread count is the environment's (OMP_NUM_THREADS, recorded in every row): on a machine shared
with other work run it at 1 thread, so the measurement does not slow the others' down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    RAW,
    REPO,
    Recorder,
    claim,
    code_env,
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

BENCH = "precision"
ROWS = {  # row -> trainer.precision (None: the matmul microbenchmark)
    "bf16-mixed": "bf16-mixed",
    "32-true": "32-true",
    "32-true again": "32-true",
    "matmul": None,
}
CLOCK = "+callbacks.step_clock._target_=experiments.benchmarks.bench_worker.StepClock"


def train_once(precision: str, warmup: int, steps: int, overrides: Sequence[str] = ()) -> dict:
    """One fresh `difflab-train` of the default job (plus ``overrides``); its steady-state speed over
    ``steps`` steps."""
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        cmd = [
            str(Path(sys.executable).parent / "difflab-train"),
            f"trainer.max_steps={warmup + steps + 1}",  # +1: the last step writes last.ckpt, untimed
            "callbacks.sample_grid=null",
            "logger=none",
            f"trainer.precision={precision}",
            f"hydra.run.dir={tmp}/run",
            CLOCK,
            *overrides,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=code_env())
    lines = [line for line in p.stdout.splitlines() if line.startswith("STEP_CLOCK=")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    clock = json.loads(lines[-1][len("STEP_CLOCK=") :])
    t, c = clock["times"], clock["cpu"]
    seconds = t[warmup + steps - 1] - t[warmup - 1]  # steps warmup+1 .. warmup+steps
    cpu_seconds = c[warmup + steps - 1] - c[warmup - 1]
    return {
        "steps_per_sec": steps / seconds,
        "step_ms": 1000 * seconds / steps,
        "steps_per_cpu_sec": steps / cpu_seconds,
        "cpu_step_ms": 1000 * cpu_seconds / steps,
        "threads": clock["threads"],
    }


def matmul_once() -> dict:
    out = run_worker("matmul")
    out["matmul_ratio"] = out["matmul_bf16_gflops"] / out["matmul_fp32_gflops"]
    out["matmul_ratio_cpu"] = out["matmul_bf16_gflops_cpu"] / out["matmul_fp32_gflops_cpu"]
    return out


def measure(repeats: int, warmup: int, steps: int, raw_dir: Path) -> None:
    rec = Recorder(BENCH, raw_dir)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    for k, row in interleaved(list(ROWS), repeats):
        precision = ROWS[row]
        if precision is None:
            r = matmul_once()
        else:
            r = train_once(precision, warmup, steps)
            r.update(precision=precision, warmup=warmup, steps=steps)
        rec.record(row=row, repeat=k, omp_num_threads=threads, **r)
        print(json.dumps({"repeat": k, "row": row, **r}), flush=True)


def _newest(records: list[dict]) -> list[dict]:
    """Every record of the newest invocation that measured a bf16-mixed training run."""
    newest = latest(records, row="bf16-mixed")
    if not newest:
        return []
    return [r for r in records if r["invocation"] == newest[0]["invocation"]]


def report() -> None:
    records = _newest(load(BENCH))
    if not records:
        sys.exit(f"no raw/{BENCH}.jsonl records: run the benchmark first")
    by = {row: [r for r in records if r["row"] == row] for row in ROWS}
    # Only whole alternations: a run killed mid-alternation leaves rows without their pair.
    whole = set.intersection(*({r["repeat"] for r in by[row]} for row in ROWS))
    by = {row: [r for r in rs if r["repeat"] in whole] for row, rs in by.items()}
    get = {row: {r["repeat"]: r for r in by[row]} for row in ROWS}
    rows = []
    for k in sorted(whole):
        b, f, a, m = (get[row][k] for row in ROWS)
        rows.append(
            [
                k,
                b["steps_per_sec"],
                f["steps_per_sec"],
                a["steps_per_sec"],
                b["steps_per_sec"] / f["steps_per_sec"],
                a["steps_per_sec"] / f["steps_per_sec"],
                b["steps_per_cpu_sec"] / f["steps_per_cpu_sec"],
                a["steps_per_cpu_sec"] / f["steps_per_cpu_sec"],
                m["matmul_bf16_gflops_cpu"],
                m["matmul_fp32_gflops_cpu"],
                m["matmul_ratio_cpu"],
            ]
        )

    def iv(key: str, numer: str, denom: str = "32-true") -> object:
        return interval(ratio_pairs(by[numer], by[denom], key))

    def speed_verdict(ratio: object) -> str:
        return claim(ratio, 1.0, lower_is_better=False)

    wall, wall_floor = iv("steps_per_sec", "bf16-mixed"), iv("steps_per_sec", "32-true again")
    cpu, cpu_floor = iv("steps_per_cpu_sec", "bf16-mixed"), iv("steps_per_cpu_sec", "32-true again")
    mm = interval([r["matmul_ratio_cpu"] for r in by["matmul"]])
    mm_wall = interval([r["matmul_ratio"] for r in by["matmul"]])
    sample = by["bf16-mixed"][0]
    threads = sorted({str(r["threads"]) for r in records if "threads" in r})
    body = "\n".join(
        [
            "## Precision: bf16-mixed vs 32-true on the default job",
            "",
            machine_line(records),
            "",
            f"Default job (`difflab-train`: flow, `small` UNet, Fashion-MNIST, batch 32; no sample grid, no "
            f"logger), a fresh process per figure, {sample['steps']} optimizer steps timed after "
            f"{sample['warmup']} warm-up steps, {', '.join(threads)} thread(s); the rows interleaved in "
            f"each of {len(whole)} alternations. Speed by the wall clock (steps/s) and by the process's CPU "
            "time (steps per CPU second: on a machine shared with other work, the figure the others disturb "
            "least; at 1 thread it is the wall-clock speed of an idle machine). Matmul: 2048x2048, GFLOP/s "
            "of CPU time.",
            "",
            table(
                [
                    "alternation",
                    "bf16-mixed step/s",
                    "32-true step/s",
                    "32-true again step/s",
                    "bf16 ÷ fp32 (wall)",
                    "A/A (wall)",
                    "bf16 ÷ fp32 (CPU time)",
                    "A/A (CPU time)",
                    "matmul bf16",
                    "matmul fp32",
                    "matmul bf16 ÷ fp32",
                ],
                rows,
            ),
            "",
            table(
                ["figure", "median [95% interval]", "verdict: bf16-mixed faster than 32-true"],
                [
                    ["step speed per CPU second, bf16-mixed ÷ 32-true", str(cpu), speed_verdict(cpu)],
                    ["noise floor (CPU time): 32-true again ÷ 32-true", str(cpu_floor), ""],
                    [
                        "step speed by the wall clock, bf16-mixed ÷ 32-true",
                        str(wall),
                        speed_verdict(wall),
                    ],
                    ["noise floor (wall clock): 32-true again ÷ 32-true", str(wall_floor), ""],
                    ["matmul GFLOP/s, bf16 ÷ fp32 (CPU time)", str(mm), ""],
                    ["matmul GFLOP/s, bf16 ÷ fp32 (wall clock)", str(mm_wall), ""],
                ],
            ),
        ]
    )
    write_section(BENCH, body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's section from raw JSON lines")
    ap.add_argument("--repeats", type=int, default=5, help="alternations (>= 5 for a speed claim)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=150, help="timed optimizer steps")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    opts = ap.parse_args()
    if opts.report:
        report()
    else:
        measure(opts.repeats, opts.warmup, opts.steps, opts.raw_dir)


if __name__ == "__main__":
    main()
