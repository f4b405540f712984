"""bf16-mixed against 32-true on the default job, on the CPU at hand (issue 29: which precision each CPU
class runs fastest; `difflab.precision.auto_precision` follows the result).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/precision_bench.py [--repeats 5] [--steps 150]
    .venv/bin/python experiments/benchmarks/precision_bench.py --report      # RESULTS.md section "precision"

Each alternation runs, each in a fresh process: the default job (`difflab-train`: flow, `small` UNet,
Fashion-MNIST, batch 32, its callbacks and progress bar; no sample grid, no logger) in bf16-mixed, in
32-true, in 32-true again (the A-vs-A noise floor: what two identical runs differ by at that moment),
and a 2048x2048 matmul in bf16 and fp32 (bench_worker's ``matmul``). A run's speed is its steady-state
steps/s: ``--steps`` optimizer steps after ``--warmup`` (the last step, which writes the checkpoint,
is not timed). Ratios are taken within each alternation (protocol.py); the end-FID comparison of the
two precisions is time_to_quality's, not this script's.

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    RAW,
    REPO,
    Recorder,
    interleaved,
    interval,
    latest,
    load,
    machine_line,
    ratio_pairs,
    table,
    verdict,
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


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(REPO)}


def train_once(precision: str, warmup: int, steps: int) -> dict:
    """One fresh `difflab-train` of the default job; its steady-state speed over ``steps`` steps."""
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        cmd = [
            str(Path(sys.executable).parent / "difflab-train"),
            f"trainer.max_steps={warmup + steps + 1}",  # +1: the last step writes last.ckpt, untimed
            "callbacks.sample_grid=null",
            "logger=none",
            f"trainer.precision={precision}",
            f"hydra.run.dir={tmp}/run",
            CLOCK,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env())
    lines = [line for line in p.stdout.splitlines() if line.startswith("STEP_CLOCK=")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    clock = json.loads(lines[-1][len("STEP_CLOCK=") :])
    t = clock["times"]
    seconds = t[warmup + steps - 1] - t[warmup - 1]  # steps warmup+1 .. warmup+steps
    return {"steps_per_sec": steps / seconds, "step_ms": 1000 * seconds / steps, "threads": clock["threads"]}


def matmul_once() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_matmul_") as tmp:
        args = [sys.executable, str(HERE / "bench_worker.py"), "matmul", "--tmp", tmp]
        p = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=_env())
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"matmul failed:\n{p.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["matmul_ratio"] = out["matmul_bf16_gflops"] / out["matmul_fp32_gflops"]
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


def report() -> None:
    records = latest(load(BENCH), row="bf16-mixed")
    if not records:
        sys.exit(f"no raw/{BENCH}.jsonl records: run the benchmark first")
    by = {row: [r for r in records if r["row"] == row] for row in ROWS}
    speed = {row: {r["repeat"]: r["steps_per_sec"] for r in by[row]} for row in ROWS if ROWS[row]}
    mm = {r["repeat"]: r for r in by["matmul"]}
    ratio = ratio_pairs(by["bf16-mixed"], by["32-true"], "steps_per_sec")
    floor = ratio_pairs(by["32-true again"], by["32-true"], "steps_per_sec")
    mm_ratio = [r["matmul_ratio"] for r in by["matmul"]]
    rows = []
    for k in sorted(speed["bf16-mixed"]):
        fp32 = speed["32-true"].get(k)
        again = speed["32-true again"].get(k)
        bf16 = speed["bf16-mixed"][k]
        m = mm.get(k, {})
        rows.append(
            [
                k,
                bf16,
                fp32 if fp32 else "-",
                again if again else "-",
                bf16 / fp32 if fp32 else "-",
                again / fp32 if fp32 and again else "-",
                m.get("matmul_bf16_gflops", "-"),
                m.get("matmul_fp32_gflops", "-"),
                m.get("matmul_ratio", "-"),
            ]
        )
    iv, iv_floor = interval(ratio), interval(floor)
    sample = by["bf16-mixed"][0]
    threads = {r["threads"] for r in records if "threads" in r}
    body = "\n".join(
        [
            "## Precision: bf16-mixed vs 32-true on the default job",
            "",
            machine_line(records),
            "",
            f"Default job (`difflab-train`: flow, `small` UNet, Fashion-MNIST, batch 32; no sample grid, no "
            f"logger), a fresh process per figure, steady-state steps/s over {sample['steps']} optimizer "
            f"steps after {sample['warmup']} warm-up steps, at {', '.join(map(str, sorted(threads)))} "
            "thread(s); rows interleaved in each alternation. Matmul: 2048x2048, GFLOP/s.",
            "",
            table(
                [
                    "alternation",
                    "bf16-mixed step/s",
                    "32-true step/s",
                    "32-true again step/s",
                    "bf16 ÷ fp32",
                    "fp32 again ÷ fp32 (A/A)",
                    "matmul bf16 GFLOP/s",
                    "matmul fp32 GFLOP/s",
                    "matmul bf16 ÷ fp32",
                ],
                rows,
            ),
            "",
            table(
                ["figure", "median [95% interval]", "verdict: bf16-mixed faster than 32-true"],
                [
                    ["training step speed, bf16-mixed ÷ 32-true", str(iv), verdict(iv, 1.0, False)],
                    ["noise floor: 32-true again ÷ 32-true", str(iv_floor), ""],
                    ["matmul GFLOP/s, bf16 ÷ fp32", str(interval(mm_ratio)), ""],
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
