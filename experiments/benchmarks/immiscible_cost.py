"""What `model.immiscible=true` costs per training step: the noise-to-image assignment alone.

    .venv/bin/python experiments/benchmarks/immiscible_cost.py [--repeats 5]
    .venv/bin/python experiments/benchmarks/immiscible_cost.py --report   # RESULTS.md block "immiscible_cost"

Times `difflab.diffusion.noise.immiscible_noise` (distances by torch.cdist, Hungarian assignment by
scipy on the host) for batch sizes and image shapes from the CPU default up to large GPU batches. Under
the protocol (PROTOCOL.md): the cases alternate over ``--repeats`` rounds in one process (one figure per
case and round: the median of 7 calls after a warm-up), and the first case is timed twice in every round
(``again``), the noise floor. The assignment is O(B^3) in the batch and linear in the pixels; its share of
a step is this time over the step time of the run it is added to (not measured here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402  (this folder is not a package on sys.path)
    Recorder,
    interleaved,
    interval,
    latest,
    load,
    machine_line,
    ratio_pairs,
    table,
    write_section,
)

BENCH = "immiscible_cost"
CASES = [  # (per-device batch, channels, size): data=fashion_mnist / twemoji, the flowers recipe, GPU batches
    (32, 1, 28),
    (32, 3, 32),
    (16, 3, 64),
    (64, 3, 64),
    (128, 3, 64),
    (256, 3, 64),
    (512, 3, 64),
]
KEYS = ("total_ms", "distances_ms", "assignment_ms")
AGAIN = "32x1x28 again"  # the first case timed a second time each round: the A/A noise floor


def case_name(batch: int, channels: int, size: int) -> str:
    return f"{batch}x{channels}x{size}"


def median_seconds(fn: Callable[[], object], calls: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(batch: int, channels: int, size: int) -> tuple[float, float, float]:
    """Median seconds of: the whole call, its distance matrix, its Hungarian assignment."""
    import torch
    from scipy.optimize import linear_sum_assignment

    from difflab.diffusion.noise import immiscible_noise

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    noise = torch.randn(batch, channels, size, size, generator=g)
    dist = torch.cdist(x0.flatten(1), noise.flatten(1)).numpy()
    return (
        median_seconds(lambda: immiscible_noise(x0, noise)),
        median_seconds(lambda: torch.cdist(x0.flatten(1), noise.flatten(1))),
        median_seconds(lambda: linear_sum_assignment(dist)),
    )


def run(repeats: int) -> None:
    import torch

    rec = Recorder(BENCH)
    shapes = {case_name(*c): c for c in CASES}
    shapes[AGAIN] = CASES[0]
    for k, row in interleaved(list(shapes), repeats):
        total, dist, assign = (s * 1000 for s in time_case(*shapes[row]))
        batch, channels, size = shapes[row]
        rec.record(
            row=row,
            repeat=k,
            batch=batch,
            channels=channels,
            size=size,
            threads=torch.get_num_threads(),
            total_ms=total,
            distances_ms=dist,
            assignment_ms=assign,
        )
        print(f"{row:14s} round {k}: {total:.2f} ms (distances {dist:.2f}, assign {assign:.2f})", flush=True)


def report() -> None:
    records = latest(load(BENCH))
    if not records:
        write_section(BENCH, "Not measured yet under the protocol.")
        return
    rows = []
    for row in [case_name(*c) for c in CASES]:
        mine = [r for r in records if r["row"] == row]
        if mine:
            b, c, s = mine[0]["batch"], mine[0]["channels"], mine[0]["size"]
            rows.append([b, f"{c}x{s}x{s}", *(str(interval([r[k] for r in mine])) for k in KEYS)])
    lines = [
        "## `model.immiscible=true`: the noise-to-image assignment's cost per step (ms)",
        "",
        f"Each figure: the median of 7 calls per round, over rounds that alternate the cases; "
        f"{records[0]['threads']} intra-op thread(s).",
        "",
        table(["batch", "image", "ms per step", "of which distances", "of which assignment"], rows),
    ]
    base = case_name(*CASES[0])
    first = [r for r in records if r["row"] == base]
    again = [r for r in records if r["row"] == AGAIN]
    if first and again:
        floor = interval(ratio_pairs(again, first, "total_ms"))
        lines += ["", f"Noise floor: `{AGAIN}` ÷ `{base}`, ms per step: {floor}."]
    lines += ["", machine_line(records)]
    write_section(BENCH, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's block from raw JSON lines")
    ap.add_argument("--repeats", type=int, default=5, help="rounds over all cases (>= 5: a speed claim)")
    opts = ap.parse_args()
    if opts.report:
        report()
    else:
        run(opts.repeats)
        print(f"raw results appended to raw/{BENCH}.jsonl; `{Path(__file__).name} --report` writes the table")


if __name__ == "__main__":
    main()
